"""File access shared by sources and destinations: fsspec filesystems with S3 client
defaults, a fast path for local files, lazy file loaders, a faster tar reader, and one-line
error messages."""

from __future__ import annotations

import csv
import os
import tarfile
from dataclasses import dataclass
from typing import IO, Any, Self

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clip_data.errors import SourceError

__all__ = [
    "S3_CLIENT_DEFAULTS",
    "FileBytes",
    "TarHeader",
    "file_or_loader",
    "find_files",
    "is_read_error",
    "list_names",
    "open_fs",
    "open_tar",
    "read_optional",
    "short_error",
    "storage_options_for",
]

_MAX_ERROR_CHARS = 300


#: botocore settings every ``s3://`` source or destination gets unless ``storage_options``
#: ``config_kwargs`` sets its own: an unreachable endpoint fails within seconds, where
#: botocore's defaults retry with backoff for a long while.
S3_CLIENT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 2, "mode": "standard"},
}


def storage_options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` for ``uri`` with :data:`S3_CLIENT_DEFAULTS` filled in for S3."""
    options = dict(storage_options or {})
    if uri.split("://", 1)[0].lower() in ("s3", "s3a"):
        options["config_kwargs"] = {**S3_CLIENT_DEFAULTS, **options.get("config_kwargs", {})}
    return options


def open_fs(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The fsspec filesystem for ``uri`` and the protocol-less path, trailing slash removed."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options))
    return fs, str(path).rstrip("/") or "/"


def _is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def read_optional(fs: Any, path: str) -> bytes | None:
    """The bytes of ``path``, ``None`` if it does not exist (a missing image is a record).

    Local files are read with ``open`` directly: fsspec's per-call path handling costs more
    than reading a small image.
    """
    try:
        if _is_local(fs):
            with open(path, "rb") as fh:  # noqa: PTH123 - the fastest way to read a file
                return fh.read()
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class FileBytes:
    """An :class:`~clip_data.records.BytesLoader` for one file of an fsspec filesystem.

    Picklable (fsspec filesystems pickle as their class and options), so an ingest worker
    process reads the file itself. A read error other than a missing file raises a short
    :class:`SourceError` naming the source and the file.
    """

    fs: Any
    path: str
    source: str

    def read(self) -> bytes | None:
        """The file's bytes, ``None`` if it does not exist."""
        try:
            return read_optional(self.fs, self.path)
        except Exception as error:
            if not is_read_error(error):
                raise
            raise SourceError(
                f"cannot read source {self.source!r}: {self.path}: {short_error(error)}"
            ) from None


def file_or_loader(
    fs: Any, path: str, source: str, lazy: bool
) -> tuple[bytes | None, FileBytes | None]:
    """``(bytes, None)``, or ``(None, loader)`` when ``lazy``: the fields of a RawRecord."""
    if lazy:
        return None, FileBytes(fs, path, source)
    return read_optional(fs, path), None


def find_files(fs: Any, root: str) -> list[str]:
    """Sorted paths of all files under the folder ``root`` (``os.walk`` for local files)."""
    if not _is_local(fs):
        return sorted(str(p) for p in fs.find(root))
    found: list[str] = []
    for folder, _dirs, names in os.walk(root):
        prefix = _dir_prefix(folder)
        found.extend([prefix + name for name in names])  # = posixpath.join, for plain names
    return sorted(found)


def _dir_prefix(folder: str) -> str:
    """``folder`` with exactly one trailing ``/`` (a folder name to prefix entry names with)."""
    return folder if folder.endswith("/") else folder + "/"


def list_names(fs: Any, root: str) -> list[str]:
    """The entries of the folder ``root`` (``os.listdir`` for local files: fsspec's ``ls``
    normalises every path it returns, which costs more than the listing itself)."""
    if _is_local(fs):
        names = os.listdir(root)  # noqa: PTH208 - plain names, no Path object per entry
        prefix = _dir_prefix(root)
        return [prefix + name for name in names]
    return [str(p) for p in fs.ls(root, detail=False)]


def short_error(error: BaseException) -> str:
    """One line naming the error and its cause; access errors get a hint."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    if isinstance(error, PermissionError):
        text = f"access denied, check the credentials and permissions ({text})"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def is_read_error(error: Exception) -> bool:
    """An I/O, storage or file-format error (not a bug, not already a SourceError)."""
    if isinstance(error, SourceError):
        return False
    if isinstance(error, OSError | EOFError | tarfile.TarError | UnicodeError | csv.Error):
        return True
    return type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "pyarrow")


#: Magic numbers tarfile's ``"r|*"`` mode recognises as compressed (its ``_StreamProxy``).
_COMPRESSED_MAGIC: tuple[bytes, ...] = (b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ")
_NUL = b"\0"
#: (start, end) of the header's octal number fields tarfile parses, the checksum first:
#: chksum, mode, uid, gid, size, mtime, devmajor, devminor.
_NUMBER_FIELDS: tuple[tuple[int, int], ...] = (
    (148, 156),
    (100, 108),
    (108, 116),
    (116, 124),
    (124, 136),
    (136, 148),
    (329, 337),
    (337, 345),
)


def _text_field(buf: bytes | bytearray, start: int, end: int, encoding: str, errors: str) -> str:
    """A NUL-terminated text field of a tar header, decoded as ``tarfile.nts`` does."""
    return buf[start:end].split(_NUL, 1)[0].decode(encoding, errors)


class TarHeader(tarfile.TarInfo):
    """``tarfile.TarInfo`` with a faster :meth:`frombuf` for plain file and directory headers.

    Python's header parser costs more than the rest of reading a WebDataset sample. Headers of
    regular files and directories whose number fields are plain octal and whose (unsigned)
    checksum matches are parsed here into the same fields ``tarfile`` would set; every other
    block (end of archive, bad checksum, links, devices, pax and GNU long-name headers, sparse
    files, base-256 numbers, anything odd) goes to ``tarfile``'s own parser unchanged, so
    errors and special members behave exactly as before.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        """The member described by the 512-byte header ``buf`` (see the class docstring)."""
        kind = bytes(buf[156:157])
        if len(buf) != tarfile.BLOCKSIZE or kind not in (
            tarfile.REGTYPE,
            tarfile.AREGTYPE,
            tarfile.DIRTYPE,
        ):
            return super().frombuf(buf, encoding, errors)
        try:
            numbers = [
                int(buf[a:b].split(_NUL, 1)[0].strip() or b"0", 8) for a, b in _NUMBER_FIELDS
            ]
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        chksum = numbers[0]
        if buf[148] in (0o200, 0o377) or chksum != 256 + sum(buf) - sum(buf[148:156]):
            return super().frombuf(buf, encoding, errors)
        info = cls()
        info.name = _text_field(buf, 0, 100, encoding, errors)
        info.mode, info.uid, info.gid, info.size, info.mtime = numbers[1:6]
        info.chksum = chksum
        info.type = kind
        info.linkname = _text_field(buf, 157, 257, encoding, errors)
        info.uname = _text_field(buf, 265, 297, encoding, errors)
        info.gname = _text_field(buf, 297, 329, encoding, errors)
        info.devmajor, info.devminor = numbers[6:8]
        prefix = _text_field(buf, 345, 500, encoding, errors)
        if kind == tarfile.AREGTYPE and info.name.endswith("/"):
            info.type = tarfile.DIRTYPE  # the V7 way of writing a directory
        if info.type == tarfile.DIRTYPE:
            info.name = info.name.rstrip("/")
        if prefix:  # a ustar long name (GNU long names are pax-like members: tarfile's job)
            info.name = prefix + "/" + info.name
        return info


def open_tar(fileobj: IO[bytes], bufsize: int) -> tarfile.TarFile:
    """``fileobj`` as a tar read front to back.

    A seekable, uncompressed file is read directly (tarfile's stream layer copies its buffer
    on every read); anything else, compressed or not seekable, in tarfile's stream mode
    ``"r|*"`` with a ``bufsize`` buffer. Either way members come in archive order, headers
    parsed by :class:`TarHeader`, with the same errors.
    """
    try:
        seekable = fileobj.seekable()
    except (AttributeError, OSError, ValueError):
        seekable = False
    if seekable:  # peek at the start as tarfile's "r|*" does to detect compression
        start = fileobj.tell()
        head = fileobj.read(tarfile.BLOCKSIZE)
        fileobj.seek(start)
        bz2 = head[0:3] == b"BZh" and head[4:10] == b"1AY&SY"
        if not (head.startswith(_COMPRESSED_MAGIC) or bz2):
            return tarfile.TarFile(fileobj=fileobj, mode="r", tarinfo=TarHeader)
    return tarfile.open(fileobj=fileobj, mode="r|*", bufsize=bufsize, tarinfo=TarHeader)
