"""Deterministic Parquet shard writer with a manifest and a quarantine file.

An ingest output directory holds::

    part-00000.parquet, part-00001.parquet, ...   accepted rows (row_schema(extra_columns))
    quarantine.parquet                            rejected rows (QUARANTINE_SCHEMA), always present
    manifest.json                                 counts, per-file sizes and SHA-256, duplicates

The format itself (schemas, :class:`ShardConfig`, the manifest layout, reading back) lives in
:mod:`clip_data.shard_format` and is re-exported here.

Extra metadata becomes typed ``extra.<key>`` columns plus a leftover ``extra_json`` column;
the extra schema is inferred from the first row group (see :mod:`clip_data.extras`).

Every row handed to the writer is accounted for: ``read == accepted + duplicates +
quarantined``. Exact duplicate images (same SHA-256 of the original bytes) keep their first
occurrence; later ones are listed in the manifest.

Determinism: the same rows in the same order with the same configuration give byte-identical
files and an identical manifest. Nothing time- or host-dependent is written (Parquet's
``created_by`` names the pyarrow version only; the manifest holds no timestamps or paths).

Atomicity: everything is written into a hidden temporary directory beside ``dest`` and only
renamed into place by :meth:`ShardWriter.close`. An existing output at ``dest`` is replaced
only after the new one is complete (it is moved aside, the new directory renamed in, then the
old one deleted; POSIX cannot atomically swap non-empty directories, so a crash in that short
window leaves the old output under a ``.<name>.old-*`` name). On any failure the temporary
directory is removed and ``dest`` is left untouched.

Memory: rows are streamed to the current shard; at most one row group (``row_group_rows``
rows, and never more than about ``target_shard_bytes``) is buffered. The duplicate index
holds one SHA-256 per accepted row.

Only local filesystem destinations: :func:`clip_data.ingest.ingest_records` stages an
``s3://`` destination locally and uploads it (:mod:`clip_data.remote`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

from clip_data.checks import CheckedRecord, Rejection
from clip_data.extras import EXTRA_JSON, infer_extra_types, split_extra
from clip_data.records import SPLITS
from clip_data.shard_format import (
    INT32_MAX,
    MANIFEST_NAME,
    MAX_ROW_GROUP_BYTES,
    QUARANTINE_NAME,
    QUARANTINE_SCHEMA,
    ROW_SCHEMA,
    SCHEMA_VERSION,
    Manifest,
    ParquetStream,
    ShardConfig,
    canonical_json,
    iter_rows,
    read_manifest,
    row_schema,
    shard_name,
)

__all__ = [
    "MANIFEST_NAME",
    "QUARANTINE_NAME",
    "QUARANTINE_SCHEMA",
    "ROW_SCHEMA",
    "SCHEMA_VERSION",
    "Manifest",
    "ShardConfig",
    "ShardWriter",
    "iter_rows",
    "read_manifest",
    "row_schema",
    "shard_name",
]

_DEFAULT_CONFIG = ShardConfig()  # frozen, so a shared default is safe
#: The columns every shard starts with; the extra metadata columns follow.
_BASE_COLUMNS = ROW_SCHEMA.names[: ROW_SCHEMA.get_field_index(EXTRA_JSON)]


def _row_values(row: CheckedRecord, verify_sha256: bool = True) -> tuple[Any, ...]:
    """Validate a :class:`CheckedRecord` and return its column values in ROW_SCHEMA order.

    Raises ``TypeError``/``ValueError`` for a malformed row (a programming error upstream,
    not bad data: :func:`clip_data.checks.check_record` only builds well-formed rows).
    """
    if not isinstance(row, CheckedRecord):
        raise TypeError(f"add() takes a CheckedRecord, got {type(row).__name__}")
    for name in ("key", "caption", "sha256", "source", "split"):
        if not isinstance(getattr(row, name), str):
            raise TypeError(f"row {row.key!r}: {name} must be str")
    if not isinstance(row.image, bytes):
        raise TypeError(f"row {row.key!r}: image must be bytes")
    for name in ("width", "height"):
        value = getattr(row, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"row {row.key!r}: {name} must be int")
        if not 0 < value <= INT32_MAX:
            raise ValueError(f"row {row.key!r}: {name}={value} out of range")
    if row.split not in SPLITS:
        raise ValueError(f"row {row.key!r}: split {row.split!r} not in {SPLITS}")
    if verify_sha256 and hashlib.sha256(row.image).hexdigest() != row.sha256:
        raise ValueError(f"row {row.key!r}: sha256 does not match the image bytes")
    if not isinstance(row.extra, dict):
        raise TypeError(f"row {row.key!r}: extra must be a dict")
    return (
        row.key,
        row.image,
        row.caption,
        row.width,
        row.height,
        row.sha256,
        row.source,
        row.split,
    )


def _raw_size(values: Iterable[Any]) -> int:
    """Rough uncompressed size of some values, in bytes (used for shard rollover)."""
    total = 0
    for value in values:
        if isinstance(value, bytes):
            total += len(value)
        elif isinstance(value, str):
            total += len(value) if value.isascii() else len(value.encode("utf-8", "replace"))
        else:
            total += 8
    return total


class _Extras:
    """The extra metadata of buffered rows, and the extra schema once it is fixed.

    Until the first row group is written, rows keep their extra dicts (checked to be JSON);
    the first flush infers the schema from them (:func:`clip_data.extras.infer_extra_types`).
    From then on each row is split into typed values and leftover JSON as it is added.
    """

    def __init__(self) -> None:
        self.types: dict[str, str] | None = None
        self.cells: list[Any] = []

    def prepare(self, extra: dict[str, Any], what: str) -> tuple[Any, int]:
        """One row's extras as a buffer cell and its rough size; ``ValueError`` if not JSON.

        Nothing is buffered yet (see :meth:`append`), so a bad row leaves no trace.
        """
        if self.types is None:
            return extra, len(canonical_json(extra, what))  # checked now, not at the flush
        values, leftover = split_extra(extra, self.types, what)
        return (values, leftover), _raw_size(values) + len(leftover or "")

    def append(self, cell: Any) -> None:
        """Buffer a cell from :meth:`prepare` (split now if the schema was fixed since)."""
        if self.types is not None and isinstance(cell, dict):
            cell = split_extra(cell, self.types, "extra")
        self.cells.append(cell)

    def columns(self) -> list[list[Any]]:
        """Take the buffered rows as column lists: one per typed key, then ``extra_json``."""
        if self.types is None:
            self.types = infer_extra_types(self.cells)
            self.cells = [split_extra(e, self.types, "extra") for e in self.cells]
        typed: list[list[Any]] = [[] for _ in self.types]
        leftovers: list[Any] = []
        for values, leftover in self.cells:
            for column, value in zip(typed, values, strict=True):
                column.append(value)
            leftovers.append(leftover)
        self.cells = []
        return [*typed, leftovers]


class ShardWriter:
    """Stream accepted and rejected rows into a new ingest output directory.

    Use as a context manager; leaving the block normally calls :meth:`close` (which publishes
    the output and returns the manifest, also available as :attr:`manifest`), leaving it with
    an exception calls :meth:`abort` (``dest`` untouched, temporary files removed)::

        with ShardWriter(dest, ShardConfig(), ingest_config={...}) as writer:
            for record in source:
                result = check_record(record, check_config)
                if isinstance(result, Rejection):
                    writer.reject(result)
                else:
                    writer.add(result)
        manifest = writer.manifest

    ``verify_sha256=False`` skips re-hashing every image to check ``sha256``, for callers
    whose rows come straight from :func:`~clip_data.checks.check_record` (which hashed the
    very bytes it returns), such as :func:`clip_data.ingest.ingest_records`.

    Files are hashed as they are written, never read back: the manifest's SHA-256s and
    :attr:`file_md5s` (what ``dvc add`` would compute for each file) come from the write.

    ``dest`` must be a local path (``ingest_records`` handles ``s3://`` destinations). An
    existing ``dest`` must be an earlier ingest output (it has a ``manifest.json``) or an
    empty directory.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        config: ShardConfig = _DEFAULT_CONFIG,
        ingest_config: dict[str, Any] | None = None,
        *,
        verify_sha256: bool = True,
    ) -> None:
        dest_str = os.fspath(dest)
        if "://" in dest_str:
            raise ValueError(f"ShardWriter writes local destinations only, got {dest_str!r}")
        if not isinstance(config, ShardConfig):
            raise TypeError(f"config must be a ShardConfig, got {type(config).__name__}")
        self.dest = Path(dest_str).absolute()
        self.config = config
        self._verify_sha256 = bool(verify_sha256)
        if ingest_config is None:
            ingest_config = {}
        if not isinstance(ingest_config, dict):
            raise TypeError("ingest_config must be a dict or None")
        # Normalise through JSON so the manifest holds exactly what read_manifest returns.
        self.ingest_config: dict[str, Any] = json.loads(
            canonical_json(ingest_config, "ingest_config")
        )
        if self.dest.exists() and not self._replaceable(self.dest):
            raise FileExistsError(
                f"{self.dest} exists and is not an ingest output (no {MANIFEST_NAME}) "
                "or an empty directory; refusing to replace it"
            )
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        self._tmp.chmod(0o755)  # mkdtemp makes it private; the published output is not

        self.manifest: Manifest | None = None
        #: MD5 of each finished file by name (the file hashes ``dvc add`` computes), taken as
        #: the bytes were written, for :func:`clip_data.versioning.stamp_manifest`.
        self.file_md5s: dict[str, str] = {}
        self._closed = False
        self._read = 0
        self._seen: dict[str, str] = {}  # sha256 -> key of the first occurrence
        self._duplicates: list[dict[str, str]] = []
        self._per_split: Counter[str] = Counter()
        self._per_reason: Counter[str] = Counter()
        self._shards: list[dict[str, Any]] = []
        self._shard: ParquetStream | None = None
        self._buffer: list[list[Any]] = [[] for _ in _BASE_COLUMNS]
        self._extras = _Extras()
        self._buffer_bytes = 0
        self._qbuffer: list[list[Any]] = [[] for _ in QUARANTINE_SCHEMA]
        try:
            self._quarantine = ParquetStream(
                self._tmp / QUARANTINE_NAME, QUARANTINE_SCHEMA, config.compression
            )
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> ShardWriter:
        """Return the writer itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Publish on a clean exit, discard everything on an exception."""
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    # ---------------------------------------------------------------- introspection

    @property
    def buffered_rows(self) -> int:
        """Accepted rows held in memory, not yet written to a shard (<= row_group_rows)."""
        return len(self._buffer[0])

    @property
    def buffered_bytes(self) -> int:
        """Raw bytes of the rows held in memory."""
        return self._buffer_bytes

    @property
    def temp_dir(self) -> Path:
        """The temporary directory being written (renamed to ``dest`` by :meth:`close`)."""
        return self._tmp

    # ---------------------------------------------------------------- writing

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is already closed")

    def add(self, row: CheckedRecord) -> None:
        """Append an accepted row, or record it as a duplicate of an earlier identical image.

        Raises ``TypeError``/``ValueError`` for a malformed row (nothing is recorded then).
        """
        self._check_open()
        values = _row_values(row, self._verify_sha256)
        extra, extra_size = self._extras.prepare(row.extra, f"row {row.key!r}: extra")
        self._read += 1
        first = self._seen.get(row.sha256)
        if first is not None:
            self._duplicates.append({"key": row.key, "duplicate_of": first, "source": row.source})
            return
        self._seen[row.sha256] = row.key
        self._per_split[row.split] += 1

        size = _raw_size(values) + extra_size
        target = self.config.target_shard_bytes
        if self._shard_rows() > 0:
            written = self._shard.bytes_written if self._shard is not None else 0
            if written + self._buffer_bytes + size > target:
                self._finish_shard()
            elif self._buffer_bytes + size > MAX_ROW_GROUP_BYTES:
                self._flush_rows()
        for column, value in zip(self._buffer, values, strict=True):
            column.append(value)
        self._extras.append(extra)
        self._buffer_bytes += size
        if self.buffered_rows >= self.config.row_group_rows:
            self._flush_rows()

    def reject(self, rejection: Rejection) -> None:
        """Append a rejected row to the quarantine file."""
        self._check_open()
        if not isinstance(rejection, Rejection):
            raise TypeError(f"reject() takes a Rejection, got {type(rejection).__name__}")
        values = (
            rejection.key,
            rejection.source,
            rejection.split,
            rejection.reason,
            rejection.detail,
        )
        if not all(isinstance(v, str) for v in values):
            raise TypeError(f"rejection {rejection.key!r}: all fields must be str")
        self._read += 1
        self._per_reason[rejection.reason] += 1
        for column, value in zip(self._qbuffer, values, strict=True):
            column.append(value)
        if len(self._qbuffer[0]) >= self.config.row_group_rows:
            self._flush_quarantine()

    def _shard_rows(self) -> int:
        """Rows in the current shard, written or buffered."""
        written = self._shard.rows if self._shard is not None else 0
        return written + self.buffered_rows

    def _flush_rows(self) -> None:
        """Write the buffered accepted rows as one row group of the current shard."""
        if self.buffered_rows == 0:
            return
        extras = self._extras.columns()  # fixes the extra schema at the first flush
        if self._shard is None:
            name = shard_name(len(self._shards))
            schema = row_schema(self._extras.types or {})
            self._shard = ParquetStream(self._tmp / name, schema, self.config.compression)
        self._shard.write([*self._buffer, *extras])
        self._buffer = [[] for _ in _BASE_COLUMNS]
        self._buffer_bytes = 0

    def _finish_shard(self) -> None:
        """Flush the buffer, close the current shard and record it."""
        self._flush_rows()
        shard = self._shard
        if shard is None:
            return
        shard.close()
        self._shard = None
        name = shard.path.name
        self._shards.append(
            {
                "file": name,
                "rows": shard.rows,
                "bytes": shard.bytes_written,
                "sha256": shard.sha256,
                "row_groups": list(shard.row_groups),  # training plans its work units from it
                "row_group_splits": list(shard.row_group_splits),  # and resumes an epoch by it
            }
        )
        self.file_md5s[name] = shard.md5

    def _flush_quarantine(self) -> None:
        self._quarantine.write(self._qbuffer)
        self._qbuffer = [[] for _ in QUARANTINE_SCHEMA]

    # ---------------------------------------------------------------- finishing

    def close(self) -> Manifest:
        """Finish all files, write ``manifest.json`` and move the output into ``dest``.

        On any failure the temporary directory is removed, ``dest`` is left as it was and the
        exception propagates.
        """
        self._check_open()
        try:
            manifest = self._finish()
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.manifest = manifest
        return manifest

    def _finish(self) -> Manifest:
        self._finish_shard()
        self._flush_quarantine()
        self._quarantine.close()
        self.file_md5s[QUARANTINE_NAME] = self._quarantine.md5
        accepted = sum(int(s["rows"]) for s in self._shards)
        quarantined = self._quarantine.rows
        duplicates = len(self._duplicates)
        if self._read != accepted + duplicates + quarantined:
            raise AssertionError(
                f"row accounting broken: read={self._read} != accepted={accepted} + "
                f"duplicates={duplicates} + quarantined={quarantined}"
            )
        manifest: Manifest = {
            "schema_version": SCHEMA_VERSION,
            "counts": {
                "read": self._read,
                "accepted": accepted,
                "duplicates": duplicates,
                "quarantined": quarantined,
                "per_split": {s: self._per_split[s] for s in sorted(self._per_split)},
                "per_reason": {r: self._per_reason[r] for r in sorted(self._per_reason)},
            },
            "shards": self._shards,
            "quarantine": {
                "file": QUARANTINE_NAME,
                "rows": quarantined,
                "sha256": self._quarantine.sha256,
            },
            "duplicates": self._duplicates,
            "extra_columns": dict(self._extras.types or {}),
            "shard_config": asdict(self.config),
            "ingest_config": self.ingest_config,
        }
        text = json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        with (self._tmp / MANIFEST_NAME).open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        return manifest

    @staticmethod
    def _replaceable(path: Path) -> bool:
        """Whether ``path`` may be replaced: an earlier ingest output or an empty directory."""
        if not path.is_dir() or path.is_symlink():
            return False
        return (path / MANIFEST_NAME).is_file() or not any(path.iterdir())

    def _publish(self) -> None:
        """Rename the finished temporary directory to ``dest``, replacing an old output."""
        dest = self.dest
        if not dest.exists():
            self._tmp.rename(dest)
            return
        if not self._replaceable(dest):
            raise FileExistsError(f"{dest} changed during ingest; refusing to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        old.rmdir()  # only the unique name is needed; rename needs a free target
        dest.rename(old)
        try:
            self._tmp.rename(dest)
        except BaseException:
            old.rename(dest)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written so far; ``dest`` is left untouched. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for stream in (self._shard, self._quarantine):
            if stream is not None:
                # Already failing: cleanup must not mask the original exception.
                with contextlib.suppress(Exception):
                    stream.close()
        self._shard = None
        shutil.rmtree(self._tmp, ignore_errors=True)
