"""The on-disk format of an ingest output: schemas, shard layout, manifest, and reading back.

An ingest output directory holds::

    part-00000.parquet, part-00001.parquet, ...   accepted rows (ROW_SCHEMA)
    quarantine.parquet                            rejected rows (QUARANTINE_SCHEMA), always present
    manifest.json                                 counts, per-file sizes and SHA-256, duplicates

This module holds what readers and the writer (:mod:`clip_data.shards`) share: the schemas,
:class:`ShardConfig`, the manifest layout, one Parquet file written row group by row group
(:class:`ParquetStream`), and :func:`read_manifest` / :func:`iter_rows`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from clip_data.extras import (
    EXTRA_JSON,
    TYPE_KEY,
    extra_field,
    extra_types_of,
    merge_extra,
    to_json,
)
from clip_data.files import is_read_error, open_fs, short_error

__all__ = [
    "MANIFEST_NAME",
    "QUARANTINE_NAME",
    "QUARANTINE_SCHEMA",
    "ROW_SCHEMA",
    "SCHEMA_VERSION",
    "Manifest",
    "ParquetStream",
    "ShardConfig",
    "canonical_json",
    "file_sha256",
    "iter_rows",
    "read_manifest",
    "row_schema",
    "shard_name",
]

SCHEMA_VERSION = 2  # 2: extra metadata as typed columns (was one JSON column)
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.parquet"

_META = {b"clipops.schema_version": str(SCHEMA_VERSION).encode()}

#: Schema of accepted rows of a source without extra metadata. With extras, the typed
#: ``extra.<key>`` columns come before ``extra_json`` (see :func:`row_schema` and
#: :mod:`clip_data.extras`).
ROW_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field(EXTRA_JSON, pa.string(), nullable=True),
    ],
    metadata=_META,
)


def row_schema(extra_types: Mapping[str, str]) -> pa.Schema:
    """The shard schema for an extra schema (key -> type, see :mod:`clip_data.extras`)."""
    base = list(ROW_SCHEMA)[:-1]
    typed = [extra_field(key, kind) for key, kind in extra_types.items()]
    return pa.schema([*base, *typed, ROW_SCHEMA.field(EXTRA_JSON)], metadata=_META)


#: Schema of quarantined rows.
QUARANTINE_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ],
    metadata=_META,
)

_COMPRESSIONS = frozenset({"zstd", "snappy", "gzip", "brotli", "lz4", "none"})
# Small, low-cardinality columns get dictionary encoding and statistics; the image bytes never
# do (statistics of a binary column would copy image prefixes into the footer).
_DICT_COLUMNS = ["source", "split"]
_IMAGE_COLUMN = "image"
_STATS_COLUMNS = ["key", "width", "height", "sha256", "source", "split"]
# A row group never buffers more than this many raw bytes (binary arrays have 2 GiB offsets).
MAX_ROW_GROUP_BYTES = 512 << 20
INT32_MAX = 2**31 - 1
_HASH_CHUNK = 1 << 20


def shard_name(index: int) -> str:
    """File name of shard number ``index`` (``part-00000.parquet``, ...)."""
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class ShardConfig:
    """How accepted rows are laid out in shard files.

    Attributes:
        target_shard_bytes: A shard is closed before the row that would take it past this
            size (file bytes written so far plus buffered raw bytes). A single row larger than
            the target gets a shard of its own.
        row_group_rows: Most rows per Parquet row group (and rows buffered in memory).
        compression: Parquet codec of every column but ``image`` (zstd, snappy, gzip, brotli,
            lz4 or none); the image column is stored uncompressed (images are compressed
            already, a codec only costs time).
    """

    target_shard_bytes: int = 64 << 20
    row_group_rows: int = 1024
    compression: str = "zstd"

    def __post_init__(self) -> None:
        """Validate the fields."""
        for name in ("target_shard_bytes", "row_group_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.compression not in _COMPRESSIONS:
            raise ValueError(
                f"compression must be one of {sorted(_COMPRESSIONS)}, got {self.compression!r}"
            )


class Manifest(TypedDict):
    """The contents of ``manifest.json``."""

    schema_version: int
    counts: dict[str, Any]
    shards: list[dict[str, Any]]
    quarantine: dict[str, Any]
    duplicates: list[dict[str, str]]
    extra_columns: dict[str, str]
    shard_config: dict[str, Any]
    ingest_config: dict[str, Any]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(value: Any, what: str) -> str:
    """Compact JSON with sorted keys; raise ``ValueError`` naming ``what`` if unserialisable."""
    return to_json(value, what)


class _HashingFile(io.RawIOBase):
    """A new binary file that hashes every byte written to it (SHA-256 for the manifest, MD5
    for the DVC dataset version), so a finished file never has to be read back."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fh = path.open("wb")
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()  # DVC's content hash, not a security measure

    def writable(self) -> bool:
        """Always ``True``."""
        return True

    def write(self, data: Any) -> int:
        """Write and hash ``data`` (any bytes-like object); return its length."""
        view = memoryview(data).cast("B")
        self._fh.write(view)
        self.sha256.update(view)
        self.md5.update(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        """Bytes written so far."""
        return self.size

    def close(self) -> None:
        """Close the underlying file."""
        if not self.closed:
            self._fh.close()
        super().close()


class ParquetStream:
    """One Parquet file written row group by row group, with its byte position tracked.

    The bytes are hashed as they are written: after :meth:`close`, :attr:`bytes_written`,
    :attr:`sha256` and :attr:`md5` describe the finished file.
    """

    def __init__(self, path: Path, schema: pa.Schema, compression: str) -> None:
        self.path = path
        self.rows = 0
        self.row_groups: list[int] = []  # rows of each row group written, in order
        self.row_group_splits: list[dict[str, int]] = []  # rows per split of each row group
        self._sink = _HashingFile(path)
        self._schema = schema
        try:
            self._writer = pq.ParquetWriter(
                self._sink,
                schema,
                # Images are already compressed: storing them plain saves the codec's time.
                compression={
                    name: "none" if name == _IMAGE_COLUMN else compression for name in schema.names
                },
                use_dictionary=[
                    f.name
                    for f in schema
                    if f.name in _DICT_COLUMNS or (f.metadata or {}).get(TYPE_KEY) == b"string"
                ],
                write_statistics=[c for c in _STATS_COLUMNS if c in schema.names],
                write_page_checksum=True,
                store_schema=True,
            )
        except BaseException:
            self._sink.close()
            raise

    @property
    def bytes_written(self) -> int:
        """Bytes in the file so far (every completed row group; the footer comes at close,
        so after :meth:`close` this is the file's size)."""
        return self._sink.size

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written (of the whole file after :meth:`close`)."""
        return self._sink.sha256.hexdigest()

    @property
    def md5(self) -> str:
        """Hex MD5 of the bytes written (DVC's file hash, after :meth:`close`)."""
        return self._sink.md5.hexdigest()

    def write(self, columns: list[list[Any]]) -> None:
        """Write ``columns`` (one list per schema field) as a single row group."""
        n = len(columns[0])
        if n == 0:
            return
        arrays = [
            pa.array(col, type=field.type) for col, field in zip(columns, self._schema, strict=True)
        ]
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        self._writer.write_table(table, row_group_size=n)
        self.rows += n
        self.row_groups.append(n)
        if "split" in self._schema.names:
            splits = Counter(str(v) for v in columns[self._schema.get_field_index("split")])
            self.row_group_splits.append(dict(sorted(splits.items())))

    def close(self) -> None:
        """Write the footer and close the file."""
        try:
            self._writer.close()
        finally:
            self._sink.close()


# -------------------------------------------------------------------- reading


def _is_url(text: str) -> bool:
    """Whether ``text`` is a URL (``s3://``, ``file://``, ...) rather than a local path."""
    return "://" in text


def _manifest_location(dest: str | os.PathLike[str]) -> str:
    """Where the manifest of ``dest`` lives, as given (``pathlib`` would mangle ``s3://``)."""
    text = os.fspath(dest)
    if _is_url(text):
        return f"{text.rstrip('/')}/{MANIFEST_NAME}"
    return str(Path(text) / MANIFEST_NAME)


def read_manifest(
    dest: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Load ``manifest.json`` of an ingest output, checking its schema version.

    ``dest`` is a local directory or any fsspec URL (``s3://bucket/prefix``; then
    ``storage_options`` are the filesystem's options, e.g. an endpoint or credentials, and S3
    gets :data:`~clip_data.files.S3_CLIENT_DEFAULTS`). Every error message names the manifest.

    Raises:
        FileNotFoundError: There is no manifest (not an ingest output).
        OSError: The manifest cannot be read (a storage failure is one line, naming the cause).
        ValueError: It is not a JSON object, or its ``schema_version`` is not supported.
    """
    where = _manifest_location(dest)
    text = _read_text(where, storage_options)
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{where}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
        )
    return manifest


def _read_text(where: str, storage_options: dict[str, Any] | None) -> str:
    """The UTF-8 text of the manifest ``where`` (a local path or an fsspec URL)."""
    try:
        if not _is_url(where):
            return Path(where).read_text(encoding="utf-8")
        fs, path = open_fs(where, storage_options)
        return bytes(fs.cat_file(path)).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{where}: no ingest manifest (not an ingest output; run `clipops ingest` first)"
        ) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text: {exc}") from None
    except Exception as error:
        if not _is_url(where) or not is_read_error(error):
            raise
        raise OSError(f"cannot read {where}: {short_error(error)}") from None


def iter_rows(dest: str | os.PathLike[str], batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Stream accepted rows back from the shards listed in the manifest, in write order.

    Each row is a dict of the base columns (key, image, caption, width, height, sha256,
    source, split) and ``extra``: the row's extra metadata as a dict, rebuilt from the typed
    ``extra.<key>`` columns and ``extra_json`` exactly as it was written.
    Only ``batch_size`` rows are materialised at a time.
    """
    manifest = read_manifest(dest)
    base = ROW_SCHEMA.names[:-1]
    for shard in manifest["shards"]:
        pf = pq.ParquetFile(Path(dest) / shard["file"])
        try:
            typed = extra_types_of(pf.schema_arrow)
            for batch in pf.iter_batches(batch_size=batch_size):
                columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
                for i in range(batch.num_rows):
                    row = {name: columns[name][i] for name in base}
                    cells = [(key, kind, columns[name][i]) for name, key, kind in typed]
                    row["extra"] = merge_extra(cells, columns[EXTRA_JSON][i])
                    yield row
        finally:
            pf.close()
