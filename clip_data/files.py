"""File access shared by sources and destinations: fsspec filesystems with S3 client
defaults, a fast path for local files, lazy file loaders, and one-line error messages."""

from __future__ import annotations

import csv
import os
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from clip_data.errors import SourceError

__all__ = [
    "S3_CLIENT_DEFAULTS",
    "FileBytes",
    "file_or_loader",
    "find_files",
    "is_read_error",
    "open_fs",
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
        found.extend(posixpath.join(folder, name) for name in names)
    return sorted(found)


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
