"""Ingest outputs on object storage (``s3://`` and any other fsspec URL).

An ingest to a remote destination is written and stamped in a local staging directory first
(:class:`~clip_data.shards.ShardWriter` needs a local directory for its atomic rename), then
uploaded by :func:`upload_output`:

1. an existing output there must be an earlier ingest output (it has a ``manifest.json``) or
   nothing at all; anything else is refused (``FileExistsError``), as for local paths;
2. the old ``manifest.json`` is deleted first, so a reader never sees a manifest listing
   shards that are being overwritten;
3. the shards and the quarantine are uploaded, then the new ``manifest.json`` last: a
   manifest present means a complete output (object stores have no atomic directory rename,
   so during an upload the prefix briefly has no manifest);
4. leftover files of the old output (shards beyond the new count, ``validation.json``) are
   deleted.

Storage failures (unreachable endpoint, bad credentials, missing bucket) raise a short
:class:`~clip_data.errors.DestinationError` naming the destination and the cause.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec

from clip_data.errors import DestinationError
from clip_data.files import short_error, storage_options_for
from clip_data.shard_format import MANIFEST_NAME

__all__ = ["is_remote", "join_uri", "upload_output"]


def is_remote(dest: str | os.PathLike[str]) -> bool:
    """Whether ``dest`` is a URL of a non-local filesystem (``s3://...``; not ``file://``)."""
    text = os.fspath(dest)
    return "://" in text and not text.startswith("file://")


def join_uri(base: str, name: str) -> str:
    """``base/name`` for a URL (``pathlib`` would collapse the ``//`` of ``s3://``)."""
    return f"{base.rstrip('/')}/{name}"


def _is_storage_error(error: Exception) -> bool:
    if isinstance(error, OSError):
        return True
    return type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs")


@contextmanager
def _storage_errors(uri: str) -> Iterator[None]:
    """Turn storage failures into a one-line :class:`DestinationError` about ``uri``."""
    try:
        yield
    except FileExistsError:
        raise
    except Exception as error:
        if not _is_storage_error(error):
            raise
        raise DestinationError(f"cannot write destination {uri!r}: {short_error(error)}") from None


def _listing(fs: Any, root: str) -> list[str]:
    """Names (relative to ``root``) of the objects under ``root``; empty when none."""
    fs.invalidate_cache(root)  # another process may have written there since
    if not fs.exists(root):
        return []
    return sorted(str(p)[len(root) :].lstrip("/") for p in fs.find(root))


def upload_output(
    local: str | os.PathLike[str], uri: str, storage_options: dict[str, Any] | None = None
) -> None:
    """Upload the finished ingest output directory ``local`` to ``uri`` (steps above).

    Raises:
        FileExistsError: ``uri`` holds objects but no ``manifest.json`` (not an ingest output).
        DestinationError: The storage cannot be reached or written.
    """
    source = Path(local)
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    if MANIFEST_NAME not in names:
        raise ValueError(f"{source} is not a finished ingest output (no {MANIFEST_NAME})")
    with _storage_errors(uri):
        fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options))
        root = str(root).rstrip("/")
        existing = _listing(fs, root)
        if existing and MANIFEST_NAME not in existing:
            raise FileExistsError(
                f"{uri} holds {len(existing)} object(s) but no {MANIFEST_NAME}: not an ingest "
                "output; refusing to replace it"
            )
        if MANIFEST_NAME in existing:
            fs.rm_file(f"{root}/{MANIFEST_NAME}")
        for name in names:
            if name != MANIFEST_NAME:
                fs.put_file(str(source / name), f"{root}/{name}")
        fs.put_file(str(source / MANIFEST_NAME), f"{root}/{MANIFEST_NAME}")
        for name in existing:
            if name not in names:
                fs.rm_file(f"{root}/{name}")
