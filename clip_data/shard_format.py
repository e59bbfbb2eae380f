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
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

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
    "shard_name",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.parquet"

_META = {b"clipops.schema_version": str(SCHEMA_VERSION).encode()}

#: Schema of accepted rows; ``extra`` is JSON text with sorted keys.
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
        pa.field("extra", pa.string(), nullable=False),
    ],
    metadata=_META,
)

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
        compression: Parquet codec: zstd, snappy, gzip, brotli, lz4 or none.
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
    try:
        return json.dumps(
            value, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from exc


class ParquetStream:
    """One Parquet file written row group by row group, with its byte position tracked."""

    def __init__(self, path: Path, schema: pa.Schema, compression: str) -> None:
        self.path = path
        self.rows = 0
        self._sink = pa.OSFile(str(path), "wb")
        self._schema = schema
        try:
            self._writer = pq.ParquetWriter(
                self._sink,
                schema,
                compression=compression,
                use_dictionary=[c for c in _DICT_COLUMNS if c in schema.names],
                write_statistics=[c for c in _STATS_COLUMNS if c in schema.names],
                write_page_checksum=True,
                store_schema=True,
            )
        except BaseException:
            self._sink.close()
            raise

    @property
    def bytes_written(self) -> int:
        """Bytes in the file so far (every completed row group; the footer comes at close)."""
        return int(self._sink.tell())

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

    def close(self) -> None:
        """Write the footer and close the file."""
        try:
            self._writer.close()
        finally:
            self._sink.close()


# -------------------------------------------------------------------- reading


def read_manifest(dest: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``manifest.json`` of an ingest output, checking its schema version."""
    path = Path(dest) / MANIFEST_NAME
    with path.open(encoding="utf-8") as fh:
        manifest: dict[str, Any] = json.load(fh)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
        )
    return manifest


def iter_rows(dest: str | os.PathLike[str], batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Stream accepted rows back from the shards listed in the manifest, in write order.

    Each row is a dict with the ROW_SCHEMA columns; ``extra`` is decoded back to a dict.
    Only ``batch_size`` rows are materialised at a time.
    """
    manifest = read_manifest(dest)
    for shard in manifest["shards"]:
        pf = pq.ParquetFile(Path(dest) / shard["file"])
        try:
            for batch in pf.iter_batches(batch_size=batch_size):
                for row in batch.to_pylist():
                    row["extra"] = json.loads(row["extra"])
                    yield row
        finally:
            pf.close()
