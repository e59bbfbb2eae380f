"""Ray Data input pipeline: Parquet shards -> decoded, augmented, tokenised training batches.

The dataset streams: Parquet files are read in blocks, a CPU map stage decodes each image,
applies the paper's training transform (random square crop, resize) and tokenises the
caption, and Ray Train splits the stream evenly between the training workers. No process
holds the whole dataset. Each worker shuffles locally with a buffer whose seed depends on the
run seed, the epoch and the rank, so every epoch sees a different, recorded order.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import torch

from clip_core.tokenizer import ClipTokenizer
from clip_core.transforms import TrainTransform, decode_image
from clip_data.shard_format import MANIFEST_NAME, read_manifest

MANIFEST = MANIFEST_NAME


class DataError(ValueError):
    """The training data cannot be used: no manifest, empty split, too few rows."""


def read_manifest_any(shards: str) -> dict[str, Any]:
    """The ingest manifest of a local or ``s3://`` shard directory.

    :func:`clip_data.shard_format.read_manifest` (schema version checked; S3 client defaults
    from :func:`clip_data.files.storage_options_for`), its errors raised as :class:`DataError`.
    """
    try:
        return read_manifest(shards)
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from exc


def shard_urls(shards: str, manifest: dict[str, Any]) -> list[str]:
    """The Parquet files listed in the manifest, as URLs under ``shards``."""
    base = shards.rstrip("/")
    return [f"{base}/{s['file']}" for s in manifest["shards"]]


def split_rows(manifest: dict[str, Any], split: str) -> int:
    """Accepted rows of ``split`` according to the manifest."""
    return int(manifest["counts"].get("per_split", {}).get(split, 0))


def read_captions(urls: list[str], split: str, limit: int) -> list[str]:
    """Up to ``limit`` captions of ``split`` (caption column only), to train a tokenizer."""
    import pyarrow.parquet as pq

    captions: list[str] = []
    for url in urls:
        with fsspec.open(url, "rb") as fh:
            table = pq.read_table(fh, columns=["caption", "split"])
        for caption, row_split in zip(
            table.column("caption").to_pylist(), table.column("split").to_pylist(), strict=True
        ):
            if row_split == split:
                captions.append(caption)
                if len(captions) >= limit:
                    return captions
    return captions


def _row_seed(seed: int, key: str, counter: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}:{counter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(merges: tuple[tuple[str, str], ...], context_length: int) -> ClipTokenizer:
    return ClipTokenizer.from_merges(merges, context_length=context_length)


def preprocess_rows(
    batch: dict[str, np.ndarray],
    *,
    merges: tuple[tuple[str, str], ...],
    context_length: int,
    image_size: int,
    scale: tuple[float, float],
    seed: int,
) -> dict[str, np.ndarray]:
    """Ray Data map stage: image bytes + caption -> image [B, 3, R, R] uint8 + tokens [B, L].

    Images leave as uint8 RGB pixels (4x fewer bytes through the object store than float32);
    the training step normalises them on its device (``clip_train.step.Stepper``).

    Runs as a plain Ray task, so worker processes (and their imports) are reused between
    epochs; the tokenizer is built once per process. The crop of each row is drawn from a
    generator seeded by (run seed, row key, a per-process call counter), so crops differ
    between epochs.
    """
    global _CALLS  # noqa: PLW0603 - a per-process counter
    _CALLS += 1
    tokenizer = _cached_tokenizer(merges, context_length)
    transform = TrainTransform(image_size, scale=scale)
    g = torch.Generator()
    images = []
    for key, data in zip(batch["key"], batch["image"], strict=True):
        g.manual_seed(_row_seed(seed, str(key), _CALLS))
        images.append(transform.pixels(decode_image(bytes(data)), generator=g))  # [3, R, R]
    tokens = tokenizer([str(c) for c in batch["caption"]], truncate=True)  # [B, L]
    return {
        "image": torch.stack(images).numpy(),  # [B, 3, R, R] uint8
        "tokens": tokens.numpy().astype(np.int64),  # [B, L]
    }


_CALLS = 0


def manifest_units(urls: list[str], manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The work units of :func:`row_group_units` from the manifest's ``row_groups`` per shard
    (written by the ingest since 2026-12): no footer is read. ``None`` for an older manifest.

    Where the manifest also has ``row_group_splits`` (rows of each split per row group),
    each unit carries them as ``split_rows``, which lets a resumed epoch find its row
    without reading anything (:func:`plan_row_range`).
    """
    shards = manifest.get("shards", [])
    if len(shards) != len(urls) or not all("row_groups" in s for s in shards):
        return None
    units = []
    for url, shard in zip(urls, shards, strict=True):
        groups = shard["row_groups"]
        splits = shard.get("row_group_splits")
        if splits is not None and len(splits) == len(groups):
            units += [  # the manifest's dicts are shared, not copied: fewer objects to collect
                {"url": url, "row_group": i, "rows": rows, "split_rows": splits[i]}
                for i, rows in enumerate(groups)
            ]
        else:
            units += [{"url": url, "row_group": i, "rows": rows} for i, rows in enumerate(groups)]
    return units


def plan_row_range(
    units: list[dict[str, Any]], split: str, start: int, stop: int
) -> list[dict[str, Any]] | None:
    """The units that hold rows ``[start, stop)`` of ``split`` (counted in unit order), each
    with ``skip`` (rows of the split to pass over, undecoded) and ``take`` (rows to keep).

    ``None`` when a unit lacks ``split_rows`` (an older manifest): the caller falls back to
    reading from the start. Raises :class:`DataError` when the split has fewer than ``stop``
    rows.
    """
    if any("split_rows" not in u for u in units):
        return None
    out: list[dict[str, Any]] = []
    seen = 0  # rows of the split before the current unit
    for unit in units:
        n = unit["split_rows"].get(split, 0)
        lo, hi = max(start, seen), min(stop, seen + n)
        if lo < hi:
            out.append({**unit, "skip": lo - seen, "take": hi - lo})
        seen += n
        if seen >= stop:
            return out
    raise DataError(f"split {split!r} has {seen} rows in its units, fewer than {stop}")


def row_group_units(urls: list[str]) -> list[dict[str, Any]]:
    """One work unit per Parquet row group: {"url", "row_group", "rows"}, from the footers
    (one read per shard, in order: :func:`manifest_units` avoids it for new manifests)."""
    import pyarrow.parquet as pq

    units = []
    for url in urls:
        with fsspec.open(url, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        units += [
            {"url": url, "row_group": i, "rows": meta.row_group(i).num_rows}
            for i in range(meta.num_row_groups)
        ]
    return units


def load_units(
    batch: dict[str, np.ndarray], *, split: str, chunk: int, **kwargs: Any
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage: read each row group, keep ``split``, yield preprocessed chunks.

    Units planned by :func:`plan_row_range` carry ``skip``/``take``: only those rows of the
    split are decoded.
    """
    import pyarrow.parquet as pq

    skips, takes = batch.get("skip"), batch.get("take")
    for j, (url, group) in enumerate(zip(batch["url"], batch["row_group"], strict=True)):
        with fsspec.open(str(url), "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(
                int(group), columns=["key", "image", "caption", "split"]
            )
        keep = [i for i, s in enumerate(table.column("split").to_pylist()) if s == split]
        if skips is not None and takes is not None:  # a resumed epoch's first unit(s)
            first = int(skips[j])
            keep = keep[first : first + int(takes[j])]  # skipped rows are never decoded
        columns = {name: table.column(name).to_pylist() for name in ("key", "image", "caption")}
        for start in range(0, len(keep), chunk):
            rows = keep[start : start + chunk]
            part = {
                name: np.array([values[i] for i in rows], dtype=object)
                for name, values in columns.items()
            }
            yield preprocess_rows(part, **kwargs)


def build_dataset(
    urls: list[str],
    *,
    split: str,
    tokenizer: ClipTokenizer,
    image_size: int,
    scale: tuple[float, float],
    seed: int,
    preprocess_cpus: float,
    preprocess_batch: int,
    units: list[dict[str, Any]] | None = None,
) -> Any:
    """A streaming ``ray.data.Dataset`` of preprocessed training rows of ``split``.

    The source is the list of row groups (read lazily by the map tasks, local or s3://),
    so no process reads more than one row group at a time. ``units`` (from
    :func:`manifest_units`) saves reading every footer first; ``None`` reads them.
    """
    import ray.data

    units = row_group_units(urls) if units is None else units
    if not units:
        raise DataError(f"no Parquet row groups in {urls}")
    fields = ("url", "row_group", "skip", "take") if "skip" in units[0] else ("url", "row_group")
    items = [{k: u[k] for k in fields} for u in units]  # scalars only: Ray Data columns
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        load_units,  # type: ignore[arg-type]
        fn_kwargs={
            "split": split,
            "chunk": preprocess_batch,
            "merges": tuple(tokenizer.merges),
            "context_length": tokenizer.context_length,
            "image_size": image_size,
            "scale": scale,
            "seed": seed,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=preprocess_cpus,
    )


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """Local shuffle seed of one worker in one epoch."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**31)
