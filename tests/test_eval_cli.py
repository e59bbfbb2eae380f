"""``clipops eval`` end to end on a tiny saved checkpoint: records, summary, plots, cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from mlflow_sections import ui_sections

from clip_cli.main import main
from clip_core import create_model
from clip_core.checkpoint import load_checkpoint, save_checkpoint
from clip_core.synthetic import generate
from clip_core.tokenizer import ClipTokenizer
from clip_eval.metrics import c_label, eval_metrics

SUITE = """
name: small
batch_size: 32
tasks:
  - {dataset: synthetic-test, task: zero_shot, dataset_options: {n_train: 60, n_test: 40}}
  - {dataset: synthetic-test, task: linear_probe, dataset_options: {n_train: 60, n_test: 40},
     options: {refine_rounds: 1}}
  - {dataset: synthetic-test, task: few_shot, dataset_options: {n_train: 60, n_test: 40},
     options: {ks: [1, 2, 4], seeds: [0, 1], c: 1.0}}
  - {dataset: synthetic-test, task: retrieval, dataset_options: {n_train: 60, n_test: 40}}
  - {dataset: synthetic-shifted, task: robustness,
     dataset_options: {n_train: 60, n_test: 40, style: blur}}
  - {dataset: sklearn-digits, task: linear_probe, dataset_options: {limit: 90},
     options: {refine_rounds: 0}}
"""
pytestmark = pytest.mark.usefixtures("torch_single_thread")
REQUIRED = {
    "dataset",
    "model",
    "checkpoint_sha256",
    "task",
    "metrics",
    "classnames",
    "templates",
    "timing",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tok = ClipTokenizer.train([s.caption for s in generate(150, "train")], 600, context_length=24)
    model = create_model("tiny-vit", text={"vocab_size": tok.vocab_size}, vision={"image_size": 64})
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", tok)


def test_clipops_eval_end_to_end(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(checkpoint), "--suite", str(suite), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == [
        "zero_shot",
        "linear_probe",
        "few_shot",
        "retrieval",
        "robustness",
        "linear_probe",
    ]
    sha = load_checkpoint(checkpoint).weights_sha256
    for r in records:
        assert set(r) >= REQUIRED, r.keys()
        assert r["checkpoint_sha256"] == sha and r["model"] == "tiny"
        assert r["timing"]["seconds"] > 0 and r["classnames"]
    zs, lp, few, retrieval, robust, digits = records
    sweep = lp["metrics"]["sweep"]
    assert c_label(lp["metrics"]["C"]) in sweep and all(0 <= a <= 1 for a in sweep.values())
    assert max(sweep.values()) == sweep[c_label(lp["metrics"]["C"])]
    assert {"C_1e-6", "C_1", "C_1e6"} <= set(sweep), sorted(sweep)  # the grid's ends and middle
    names = eval_metrics(records)  # MLflow names: unique, training charts listed first
    assert "transfer/synthetic-test/linear_probe/sweep/C_1e6" in names
    assert "transfer/synthetic-test/retrieval/text_to_image_R_10" in names
    assert not [k for k in names if "+" in k or "_e_" in k or "e-0" in k], sorted(names)
    assert ui_sections([*names, "train/loss", "train/lr"])[0] == "train"
    assert zs["templates"] and 0 <= zs["metrics"]["top1"] <= 1 and "top5" in zs["metrics"]
    assert set(zs["metrics"]["ensembling"]) >= {"bare_top1", "single_top1", "ensemble_top1"}
    assert few["metrics"]["ks"] == [1, 2, 4] and "zero_shot_top1" in few["metrics"]
    assert "text_to_image_R@10" in retrieval["metrics"]
    assert set(robust["metrics"]) == {"zero_shot", "linear_probe"}
    assert digits["classnames"] == [str(d) for d in range(10)]
    summary = (out / "summary.md").read_text()
    assert "| synthetic-shifted | robustness |" in summary
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("zeroshot_vs_linear_probe.png", "few_shot.png", "ensembling.png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    cache = sorted((out / "feature_cache").glob("*.npz"))
    assert cache and all(f.name.startswith(sha[:16]) for f in cache)
    before = {f.name: f.stat().st_mtime_ns for f in cache}

    # second run: every feature comes from the cache (files untouched, same metrics)
    assert main(["eval", "--model", str(checkpoint), "--suite", str(suite), "--out", str(out)]) == 0
    after = {f.name: f.stat().st_mtime_ns for f in (out / "feature_cache").glob("*.npz")}
    assert after == before
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]
    capsys.readouterr()


def test_clipops_eval_errors(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [{dataset: synthetic-test, task: zero_shot, extra: 1}]\n")
    assert (
        main(["eval", "--model", str(checkpoint), "--suite", str(bad), "--out", str(tmp_path)]) == 2
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "none"),
                "--suite",
                "default",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
