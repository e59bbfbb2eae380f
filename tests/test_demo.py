"""The main job (`clipops demo`): runs end to end, is reproducible, and actually learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clip_core.checkpoint import load_checkpoint
from clip_train.demo import DemoConfig, run_demo

SMALL = DemoConfig(train_samples=256, test_samples=64, epochs=2, batch_size=64, warmup_steps=2)


def test_demo_writes_a_loadable_checkpoint_and_a_complete_report(tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_demo(tmp_path / "a", SMALL, log=lines.append)
    on_disk = json.loads((tmp_path / "a" / "report.json").read_text())
    assert on_disk == report
    assert report["config"]["seed"] == 0 and report["config"]["model"] == "tiny-vit"
    assert isinstance(report["code_version"], str) and report["code_version"]
    assert report["dataset_version"].endswith(".dir")
    assert report["rows"] == {"train": 256, "test": 64}  # no duplicates in this corpus
    manifest = json.loads((tmp_path / "a" / "shards" / "manifest.json").read_text())
    assert manifest["dataset_version"]["dvc_md5"] == report["dataset_version"]
    assert json.loads((tmp_path / "a" / "shards" / "validation.json").read_text())["success"]
    assert math.isfinite(report["loss_first"]) and math.isfinite(report["loss_last"])
    loaded = load_checkpoint(report["checkpoint"])
    assert loaded.weights_sha256 == report["weights_sha256"]
    assert loaded.metadata["demo_config"] == report["config"]
    assert loaded.tokenizer is not None
    for attribute in ("colour", "shape"):
        metrics = report["zero_shot"][attribute]
        assert 0.0 <= metrics["top1"] <= 1.0
    assert any(line.startswith("zero-shot colour") for line in lines)


def test_demo_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    first = run_demo(tmp_path / "a", SMALL, log=lambda _: None)
    second = run_demo(tmp_path / "b", SMALL, log=lambda _: None)
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["zero_shot"] == second["zero_shot"]
    assert first["dataset_version"] == second["dataset_version"]
    third = run_demo(tmp_path / "c", DemoConfig(**{**SMALL.__dict__, "seed": 1}), log=print)
    assert third["weights_sha256"] != first["weights_sha256"]


@pytest.mark.slow
def test_default_demo_learns_colour_far_above_chance(tmp_path: Path) -> None:
    report = run_demo(tmp_path / "demo", DemoConfig(), log=print)
    assert report["loss_last"] < report["loss_first"] - 1.5
    colour = report["zero_shot"]["colour"]
    assert colour["top1"] > 5 * colour["chance"], colour
