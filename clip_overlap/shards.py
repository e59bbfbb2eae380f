"""Streaming the pretraining shards (``clipops ingest`` output, local or ``s3://``) in batches.

Only the columns the overlap analysis needs are read (key, image, sha256, split and the
``planted_from`` ground truth of the synthetic corpus, typed column or ``extra_json``), one
Parquet batch at a time, so memory stays bounded whatever the size of the pretraining set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from clip_data.extras import EXTRA_JSON, EXTRA_PREFIX
from clip_train.data import read_manifest_any, shard_urls, split_rows

PLANTED = "planted_from"
_BASE = ["key", "image", "sha256", "split"]


@dataclass(frozen=True)
class RowBatch:
    """Rows of one Parquet batch (already filtered to the requested split, unless None)."""

    keys: list[str]
    images: list[bytes]
    sha256: list[str]
    splits: list[str]
    planted_from: list[str | None]

    def __len__(self) -> int:
        return len(self.keys)


def count_rows(shards: str, split: str | None) -> int:
    """Rows of ``split`` (all accepted rows for ``None``) according to the manifest."""
    manifest = read_manifest_any(shards)
    if split is None:
        return int(sum(int(v) for v in manifest["counts"].get("per_split", {}).values()))
    return split_rows(manifest, split)


def _planted(columns: dict[str, list[Any]], i: int) -> str | None:
    typed = columns.get(EXTRA_PREFIX + PLANTED)
    if typed is not None and typed[i] is not None:
        return str(typed[i])
    leftover = columns.get(EXTRA_JSON)
    if leftover is not None and leftover[i]:
        value = json.loads(leftover[i]).get(PLANTED)
        return None if value is None else str(value)
    return None


def iter_batches(
    shards: str, *, split: str | None = "train", batch_size: int = 256, images: bool = True
) -> Iterator[RowBatch]:
    """Stream the rows of ``split`` (every split for ``None``) in batches of <= ``batch_size``.

    ``images=False`` skips the image column (hash-only passes read a fraction of the bytes).
    """
    import pyarrow.parquet as pq

    manifest = read_manifest_any(shards)
    for url in shard_urls(shards, manifest):
        with fsspec.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            wanted = [c for c in _BASE if images or c != "image"]
            wanted += [c for c in (EXTRA_PREFIX + PLANTED, EXTRA_JSON) if c in names]
            for batch in pf.iter_batches(batch_size=batch_size, columns=wanted):
                columns = {n: batch.column(n).to_pylist() for n in batch.schema.names}
                keep = [i for i, s in enumerate(columns["split"]) if split is None or s == split]
                if not keep:
                    continue
                yield RowBatch(
                    keys=[columns["key"][i] for i in keep],
                    images=[columns["image"][i] for i in keep] if images else [],
                    sha256=[columns["sha256"][i] for i in keep],
                    splits=[columns["split"][i] for i in keep],
                    planted_from=[_planted(columns, i) for i in keep],
                )


def fetch_rows(shards: str, split: str, ids: Iterable[int]) -> dict[int, tuple[str, bytes]]:
    """(key, image bytes) of the rows at 0-based positions ``ids`` among the ``split`` rows
    (the ids of :func:`iter_batches` order, as the overlap search numbers them).

    Reads only the ``split`` column of each shard up to the last wanted row, and of the
    shards holding a wanted row only the row groups that hold it (key and image columns):
    memory is one row group, whatever the size of the pretraining set.
    """
    import numpy as np
    import pyarrow.parquet as pq

    wanted = np.unique(np.fromiter((int(i) for i in ids), dtype=np.int64))
    wanted = wanted[wanted >= 0]
    found: dict[int, tuple[str, bytes]] = {}
    offset = 0
    manifest = read_manifest_any(shards)
    for url in shard_urls(shards, manifest):
        if found.keys() >= set(wanted.tolist()):
            break
        with fsspec.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            splits = np.asarray(
                pf.read(columns=["split"]).column("split").to_pylist(), dtype=object
            )
            positions = np.flatnonzero(splits == split)  # file rows of the split's rows
            here = wanted[(wanted >= offset) & (wanted < offset + positions.size)]
            file_rows = positions[here - offset]
            group_ends = np.cumsum(
                [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            )
            groups = np.searchsorted(group_ends, file_rows, side="right")
            for g in np.unique(groups):
                table = pf.read_row_group(int(g), columns=["key", "image"])
                first = int(group_ends[g] - table.num_rows)
                for row_id, file_row in zip(here[groups == g], file_rows[groups == g], strict=True):
                    local = int(file_row) - first
                    key = table.column("key")[local].as_py()
                    found[int(row_id)] = (str(key), table.column("image")[local].as_py())
            offset += positions.size
    return found
