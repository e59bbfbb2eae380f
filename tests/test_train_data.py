"""The training input pipeline's contract: uint8 pixels out, normalised in the step."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_workers import make_batch, make_model
from PIL import Image
from train_workers import MODEL, make_stepper

from clip_core.transforms import OPENAI_MEAN, OPENAI_STD, TrainTransform, decode_image
from clip_train.data import preprocess_rows


def _rows(n: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size + 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "PNG")
        images.append(buf.getvalue())
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "image": np.array(images, dtype=object),
        "caption": np.array([f"a photo of thing {i}" for i in range(n)], dtype=object),
    }


def test_preprocess_rows_ships_uint8_pixels_of_the_train_transform() -> None:
    merges = (("a", "b"), ("t", "h"))
    batch = _rows(3, 40)
    out = preprocess_rows(
        batch, merges=merges, context_length=16, image_size=32, scale=(0.5, 1.0), seed=1
    )
    images = out["image"]
    assert images.dtype == np.uint8 and images.shape == (3, 3, 32, 32)
    assert out["tokens"].shape == (3, 16) and out["tokens"].dtype == np.int64
    # every row is a crop of its own image: full-range noise, not a constant or a float copy
    assert all(len(np.unique(im)) > 100 for im in images)
    t = TrainTransform(32, scale=(0.5, 1.0))
    sides = {t.crop(decode_image(bytes(b))).size for b in batch["image"]}
    assert sides == {(32, 32)}


def test_the_step_normalises_uint8_pixels_like_the_float_transform() -> None:
    """Same model, same batch: uint8 pixels in == normalised floats in (loss and weights)."""
    shaped, tokens = make_batch(MODEL, 4, seed=0, dtype=torch.float32)  # [4, 3, R, R], [4, L]
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.integers(0, 256, tuple(shaped.shape), dtype=np.uint8))
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)  # [3, 1, 1]
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)  # [3, 1, 1]
    floats = (pixels.float() / 255.0 - mean) / std  # [4, 3, R, R]
    results = []
    for images in (pixels, floats):
        raw = make_model(MODEL, 0, torch.float32)
        result = make_stepper(raw, raw, accum=1).step(images, tokens, lr=1e-3)
        results.append((result.loss, [p.detach().clone() for p in raw.parameters()]))
    (loss_u8, params_u8), (loss_f, params_f) = results
    assert loss_u8 == loss_f
    assert all(torch.equal(a, b) for a, b in zip(params_u8, params_f, strict=True))


def test_work_units_come_from_the_manifest_without_reading_footers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingest records each shard's row groups; training plans from them, and validation
    catches a manifest whose row groups do not match the files."""
    import json

    import pyarrow.parquet as pq

    from clip_data.ingest import IngestConfig, ingest
    from clip_data.shard_format import ShardConfig, read_manifest
    from clip_data.validate import validate_dataset
    from clip_train.data import manifest_units, row_group_units, shard_urls

    dest = tmp_path / "shards"
    layout = ShardConfig(target_shard_bytes=12_000, row_group_rows=7)
    config = IngestConfig(workers=1, shards=layout)
    ingest("synthetic:train=60,test=10,image_size=16", dest, config, progress=False)
    manifest = read_manifest(dest)
    urls = shard_urls(str(dest), manifest)
    from_footers = row_group_units(urls)
    assert len(urls) > 1 and len({u["rows"] for u in from_footers}) > 1  # shards, short groups

    def no_footers(*_: object, **__: object) -> None:
        raise AssertionError("a footer was read")

    monkeypatch.setattr(pq, "ParquetFile", no_footers)
    planned = manifest_units(urls, manifest)
    assert planned is not None
    assert [{k: u[k] for k in ("url", "row_group", "rows")} for u in planned] == from_footers
    monkeypatch.undo()
    old = {
        **manifest,
        "shards": [{k: v for k, v in s.items() if k != "row_groups"} for s in manifest["shards"]],
    }
    assert manifest_units(urls, old) is None  # an older manifest: read the footers

    assert validate_dataset(dest).success
    manifest["shards"][0]["row_groups"] = [manifest["shards"][0]["rows"]]
    (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    report = validate_dataset(dest)
    assert not report.success and "row_groups" in report.summary() + json.dumps(report.failures)


def _ingested(tmp_path: Path) -> Path:
    from clip_data.ingest import IngestConfig, ingest
    from clip_data.shard_format import ShardConfig

    dest = tmp_path / "shards"
    layout = ShardConfig(target_shard_bytes=12_000, row_group_rows=7)
    ingest(
        "synthetic:train=60,test=10,image_size=16",
        dest,
        IngestConfig(workers=1, shards=layout),
        progress=False,
    )
    return dest


def _split_keys(units: list[dict[str, Any]], split: str) -> list[str]:
    """The keys of ``split`` in unit order, each unit's ``skip``/``take`` applied when it has
    them, read from the files (the truth to plan against)."""
    import pyarrow.parquet as pq

    keys: list[str] = []
    for u in units:
        table = pq.ParquetFile(u["url"]).read_row_group(u["row_group"])
        rows = table.select(["key", "split"]).to_pylist()
        of_split = [r["key"] for r in rows if r["split"] == split]
        first = u.get("skip", 0)
        keys += of_split[first : first + u.get("take", len(of_split))]
    return keys


def test_a_resumed_epoch_starts_at_its_row_without_decoding_the_rows_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's per-split row counts per row group locate row N of the split; the
    planned units hold exactly rows [N, M) and only those rows reach the decoder."""
    import json

    from clip_data.shard_format import read_manifest
    from clip_data.validate import validate_dataset
    from clip_train import data

    dest = _ingested(tmp_path)
    manifest = read_manifest(dest)
    urls = data.shard_urls(str(dest), manifest)
    units = data.manifest_units(urls, manifest)
    assert units is not None
    train_keys = _split_keys(units, "train")
    assert len(train_keys) == 60 and len(_split_keys(units, "test")) == 10
    assert sum(u["split_rows"].get("train", 0) for u in units) == 60

    planned = data.plan_row_range(units, "train", 13, 41)
    assert planned is not None and sum(u["take"] for u in planned) == 28
    assert len(planned) < len(units)  # the row groups before row 13 are not even opened
    decoded: list[str] = []

    def keys_only(batch: dict[str, np.ndarray], **_: object) -> dict[str, np.ndarray]:
        decoded.extend(str(k) for k in batch["key"])
        return {}

    monkeypatch.setattr(data, "preprocess_rows", keys_only)
    items = {
        k: np.array([u[k] for u in planned], dtype=object)
        for k in ("url", "row_group", "skip", "take")
    }
    list(data.load_units(items, split="train", chunk=4))
    assert decoded == train_keys[13:41]
    monkeypatch.undo()

    assert data.plan_row_range(units, "train", 0, 60) is not None
    with pytest.raises(data.DataError, match="fewer than 61"):
        data.plan_row_range(units, "train", 0, 61)
    old = [{k: v for k, v in u.items() if k != "split_rows"} for u in units]
    assert data.plan_row_range(old, "train", 13, 41) is None  # older manifest: no plan

    assert validate_dataset(dest).success
    manifest["shards"][0]["row_group_splits"][0] = {"train": 1}
    (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    report = validate_dataset(dest)
    assert not report.success and "row_group_splits" in report.summary() + json.dumps(
        report.failures
    )


def test_each_rank_gets_an_equal_contiguous_share_of_the_rest_of_the_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 ranks, batch 8, 7 batches per epoch, 2 done: rows [16, 36) and [36, 56)."""
    from clip_data.shard_format import read_manifest
    from clip_train import loop
    from clip_train.config import load_run_config
    from clip_train.data import manifest_units, shard_urls
    from clip_train.state import Progress

    dest = _ingested(tmp_path)
    manifest = read_manifest(dest)
    every = _split_keys(manifest_units(shard_urls(str(dest), manifest), manifest) or [], "train")
    cfg = load_run_config("tiny", ["data.global_batch_size=8", "infra.num_workers=2"])
    job = loop.JobSpec(
        model_config={},
        merges=[],
        context_length=8,
        steps_per_epoch=7,
        total_steps=70,
        tracking=None,
        shards=str(dest),
    )
    planned: list[list[dict[str, Any]]] = []
    monkeypatch.setattr(loop, "epoch_dataset", lambda c, j, urls, units: planned.append(units))
    for rank in (0, 1):
        loop.resumed_epoch_dataset(cfg, job, Progress(9, 1, 2, 72), rank, 2)
        assert loop.resumed_epoch_dataset(cfg, job, Progress(7, 1, 0, 56), rank, 2) is None
    assert [sum(u["take"] for u in units) for units in planned] == [20, 20]
    assert _split_keys(planned[0], "train") == every[16:36]
    assert _split_keys(planned[1], "train") == every[36:56]
