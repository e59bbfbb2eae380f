"""The ingest's tar reader (clip_data.files.open_tar / TarHeader) against Python's tarfile.

The fast header parser only takes plain file and directory headers and hands everything else
to tarfile; these tests compare both readers member by member, header by header, and on
corrupt and truncated archives, where the outcome (members read, then the same error or the
same silent end) must not change.
"""

from __future__ import annotations

import bz2
import gzip
import io
import tarfile
from collections.abc import Callable
from typing import IO, Any

import pytest

from clip_data.files import TarHeader, open_tar

_FIELDS = (
    "name",
    "mode",
    "uid",
    "gid",
    "size",
    "mtime",
    "chksum",
    "type",
    "linkname",
    "uname",
    "gname",
    "devmajor",
    "devminor",
    "pax_headers",
    "offset",
    "offset_data",
)


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def _archive(fmt: int) -> bytes:
    """A tar in ``fmt`` with every kind of member a WebDataset reader may meet."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        _member(tar, "000.jpg", b"\xff\xd8 jpeg bytes", uname="alice", gname="staff")
        _member(tar, "000.txt", b"a caption")
        _member(tar, "dir", type=tarfile.DIRTYPE, mode=0o755)
        _member(tar, "dir/001.png", b"png" * 300, mode=0o600, uid=1000, gid=100)
        _member(tar, "p" * 90 + "/" + "q" * 60 + ".txt", b"long name")  # ustar prefix
        if fmt != tarfile.USTAR_FORMAT:  # names and numbers ustar cannot hold
            _member(tar, "x" * 150 + ".jpg", b"longer than any ustar field")
            _member(tar, "big-uid.txt", b"u", uid=8**8 + 5)  # base-256 in GNU, pax otherwise
        _member(tar, "caf\u00e9/\u00fc.txt", "caf\u00e9".encode())
        _member(tar, "link.png", type=tarfile.SYMTYPE, linkname="000.jpg")
        _member(tar, "hard.png", type=tarfile.LNKTYPE, linkname="000.jpg")
        _member(tar, "fifo", type=tarfile.FIFOTYPE)
        _member(tar, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _member(tar, "../evil.txt", b"pwned")
        _member(tar, "/abs.txt", b"pwned")
        _member(tar, "empty.txt")
    return buf.getvalue()


def _v7_dir() -> bytes:
    """A V7-style directory (regular type, trailing slash) followed by a file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _member(tar, "olddir/", type=tarfile.AREGTYPE)
        _member(tar, "olddir/a.txt", b"a")
    return buf.getvalue()


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def _read(tar: tarfile.TarFile) -> list[tuple[Any, ...]]:
    """Every member's fields and, for regular files, its bytes read straight from the stream."""
    out: list[tuple[Any, ...]] = []
    for member in tar:
        fileobj = tar.fileobj
        assert fileobj is not None
        data = fileobj.read(member.size) if member.isfile() else b""
        out.append((*(getattr(member, f) for f in _FIELDS), data))
    return out


Outcome = tuple[list[tuple[Any, ...]], tuple[str, str] | None]


def _outcome(opener: Callable[[IO[bytes]], tarfile.TarFile], data: bytes) -> Outcome:
    """What reading ``data`` gives: the members read, and the error (type, message) if any."""
    members: list[tuple[Any, ...]] = []
    try:
        with opener(io.BytesIO(data)) as tar:
            for member in tar:
                fileobj = tar.fileobj
                assert fileobj is not None
                body = fileobj.read(member.size) if member.isfile() else b""
                members.append((*(getattr(member, f) for f in _FIELDS), body))
    except Exception as error:
        return members, (type(error).__name__, str(error))
    return members, None


def _stdlib(fileobj: IO[bytes]) -> tarfile.TarFile:
    return tarfile.open(fileobj=fileobj, mode="r|*", bufsize=1 << 16)


def _ours(fileobj: IO[bytes]) -> tarfile.TarFile:
    return open_tar(fileobj, 1 << 16)


class _NonSeekable(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_header_parses_as_tarfile_parses_it(fmt: str) -> None:
    data = _archive(FORMATS[fmt]) + _v7_dir()
    fast = 0
    for start in range(0, len(data), tarfile.BLOCKSIZE):
        block = data[start : start + tarfile.BLOCKSIZE]
        try:
            expected: Any = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            expected = type(error)
        try:
            got: Any = TarHeader.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            got = type(error)
        if isinstance(expected, tarfile.TarInfo):
            assert isinstance(got, TarHeader)
            assert [getattr(got, f) for f in _FIELDS] == [getattr(expected, f) for f in _FIELDS]
            fast += got.type in (tarfile.REGTYPE, tarfile.DIRTYPE)
        else:
            assert got == expected
    assert fast >= 6  # the plain headers really were in the archive


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_whole_archives_read_the_same(fmt: str) -> None:
    data = _archive(FORMATS[fmt])
    expected = _outcome(_stdlib, data)
    assert len(expected[0]) >= 13 and expected[1] is None
    assert _outcome(_ours, data) == expected
    for packed in (gzip.compress(data, mtime=0), bz2.compress(data)):  # stream mode
        assert _outcome(_ours, packed) == expected
    with open_tar(_NonSeekable(data), 1 << 16) as tar:  # type: ignore[arg-type]
        assert _read(tar) == expected[0]


def test_plain_tar_is_read_directly_and_compressed_as_a_stream() -> None:
    data = _archive(tarfile.GNU_FORMAT)
    with open_tar(io.BytesIO(data), 1 << 16) as tar:
        assert isinstance(tar.fileobj, io.BytesIO)
    with open_tar(io.BytesIO(gzip.compress(data)), 1 << 16) as tar:
        assert not isinstance(tar.fileobj, io.BytesIO)


def test_corrupt_and_truncated_archives_end_the_same_way() -> None:
    data = _archive(tarfile.PAX_FORMAT)
    cases = [data[:cut] for cut in range(0, len(data), 181)]
    for offset in (0, 100, 124, 148, 156, 257, 345, 1024, 1024 + 130, 2048 + 5):
        for value in (0x00, 0x20, 0x37, 0x80, 0xFF):
            corrupt = bytearray(data)
            corrupt[offset] = value
            cases.append(bytes(corrupt))
    errors = short = 0
    for case in cases:
        expected = _outcome(_stdlib, case)
        assert _outcome(_ours, case) == expected
        errors += expected[1] is not None
        short += expected[1] is None and len(expected[0]) < 13
    assert errors > 10 and short > 10  # both the error and the silent-end paths are exercised
