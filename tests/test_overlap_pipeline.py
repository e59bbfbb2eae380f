"""The overlap analysis end to end on a synthetic pretraining set with planted copies.

One module-scoped corpus (train + test split + near-copies of every 2nd test image planted
into train), one tiny dedicated detector trained on it, one random tiny CLIP for the
zero-shot side. The same test images are the ``synthetic-test`` evaluation dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clip_cli.main import main
from clip_core import create_model
from clip_core.checkpoint import save_checkpoint
from clip_core.dedup import DetectorConfig
from clip_core.synthetic import generate
from clip_core.tokenizer import ClipTokenizer
from clip_data.ingest import IngestConfig, ingest
from clip_overlap.detector import (
    DetectorError,
    DetectorTrainConfig,
    _mined_batch,
    load_detector,
    train_detector,
    train_on_images,
)
from clip_overlap.pipeline import OverlapConfig, run_overlap

N_TRAIN, N_TEST = 400, 80
PLANTED = list(range(0, N_TEST, 2))  # 40 of 80 test images
SUITE = f"""
name: overlap
tasks:
  - {{dataset: synthetic-test, task: zero_shot, dataset_options: {{n_train: 1, n_test: {N_TEST}}}}}
"""
pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("overlap")
    one = IngestConfig(workers=1)
    ingest("synthetic", root / "planted", one, train=N_TRAIN, test=N_TEST, plant=PLANTED)
    ingest("synthetic", root / "clean", one, train=N_TRAIN, test=N_TEST, seed=7)
    torch.manual_seed(0)
    tok = ClipTokenizer.train([s.caption for s in generate(100, "train")], 600, context_length=24)
    model = create_model("tiny-vit", text={"vocab_size": tok.vocab_size}, vision={"image_size": 64})
    ckpt = save_checkpoint(model, root / "clip", tok)
    detector = train_detector(str(root / "planted"), root / "detector", DetectorTrainConfig.tiny())
    suite = root / "suite.yaml"
    suite.write_text(SUITE)
    return {"root": root, "ckpt": ckpt, "detector": detector, "suite": suite}


@pytest.mark.slow
def test_detector_on_planted_copies(corpus: dict[str, Any]) -> None:
    """The issue's target on planted copies: recall >= 0.9 at precision >= 0.95 with the
    dedicated detector, its top-5 candidates verified by aligned comparison
    (clip_overlap.verify); the flagged match is the planted copy itself.

    The tiny detector alone (cosine of the top-1, ``verify="off"``) reaches precision 0.83
    at recall 0.375 on this corpus; with verification, the calibrated threshold (from the
    planted ground truth) reaches precision 1.0 at recall 1.0 here and on corpus seeds 1-5
    (docs/overlap.md, "Measured detection quality").
    """
    out = corpus["root"] / "out"
    report = run_overlap(
        str(corpus["root"] / "planted"),
        corpus["suite"],
        corpus["ckpt"],
        out,
        detector=corpus["detector"],
    )
    r = report["datasets"]["synthetic-test"]
    print(f"dedicated detector + verification: {r['ground_truth']}")
    assert r["calibration"] == "planted-in-shards" and r["status"] == "calibrated"
    assert r["score"] == "verified" and report["score"] == "verified"
    assert report["verify"]["k"] == 5
    assert r["ground_truth"]["planted"] == len(PLANTED)
    assert r["ground_truth"]["precision"] >= 0.95
    assert r["ground_truth"]["recall"] >= 0.9
    assert r["n_all"] == N_TEST and r["n_overlap"] + r["n_clean"] == N_TEST
    assert r["contamination"] == pytest.approx(r["n_overlap"] / N_TEST)
    matches = [json.loads(x) for x in (out / "matches.jsonl").read_text().splitlines()]
    flagged = {m["index"]: m for m in matches if m["overlap"]}
    hits = [i for i in PLANTED if i in flagged and flagged[i]["train_key"].endswith("-dup")]
    detected = r["ground_truth"]["recall"] * len(PLANTED)
    assert len(hits) >= 0.95 * detected  # the planted copy itself, not a look-alike
    for name in ("overlap.json", "overlap.md", "overlap.png", "pr_curve.json", "contact_sheet.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "overlap.json").read_text())
    assert saved["datasets"]["synthetic-test"]["n_overlap"] == r["n_overlap"]
    assert "p_value_bonferroni" in saved["datasets"]["synthetic-test"]


@pytest.mark.slow
def test_nothing_planted_gives_near_zero_contamination_and_a_threshold_that_holds(
    corpus: dict[str, Any],
) -> None:
    report = run_overlap(
        str(corpus["root"] / "clean"),
        corpus["suite"],
        corpus["ckpt"],
        detector=corpus["detector"],
        config=OverlapConfig(calibration_copies=N_TEST),
    )
    r = report["datasets"]["synthetic-test"]
    assert r["calibration"] == "simulated" and r["score"] == "verified"
    assert r["ground_truth"] is None
    assert r["contamination"] <= 0.05

    # Out of sample: the threshold this calibration chose without any ground truth, applied
    # by hand to the planted corpus, still meets the target there (seen: p 1.0, r 0.975).
    threshold = float(r["threshold"])
    planted = run_overlap(
        str(corpus["root"] / "planted"),
        corpus["suite"],
        corpus["ckpt"],
        detector=corpus["detector"],
        config=OverlapConfig(threshold=threshold),
    )
    held_out = planted["datasets"]["synthetic-test"]
    print(f"threshold from the clean corpus {threshold:.4f}: {held_out['ground_truth']}")
    assert held_out["threshold_source"] == "manual"
    assert held_out["threshold"] == pytest.approx(threshold)
    assert held_out["ground_truth"]["precision"] >= 0.95
    assert held_out["ground_truth"]["recall"] >= 0.9


@pytest.mark.slow
def test_clip_tower_as_detector_is_reported_for_comparison(corpus: dict[str, Any]) -> None:
    """The paper's baseline: CLIP image embeddings. Measured, not required to be good."""
    report = run_overlap(
        str(corpus["root"] / "planted"), corpus["suite"], corpus["ckpt"], embedding="clip"
    )
    r = report["datasets"]["synthetic-test"]
    assert report["embedding"]["kind"] == "clip"
    assert r["score"] == "cosine" and report["verify"] is None  # verify="auto": detector only
    print(f"CLIP tower as detector: {r['ground_truth']}")  # recorded in docs/overlap.md
    assert r["ground_truth"]["recall"] is not None and r["ground_truth"]["precision"] is not None
    gt = r["ground_truth"]
    assert gt["precision"] < 0.95 or gt["recall"] < 0.9  # a random tower misses the target


@pytest.mark.slow
def test_clipops_overlap_cli(corpus: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["overlap", "--train", str(corpus["root"] / "planted"), "--suite", str(corpus["suite"])]
    args += ["--model", str(corpus["ckpt"]), "--out", str(out)]
    assert main([*args, "--detector", str(corpus["detector"]), "--threshold", "0"]) == 0
    report = json.loads((out / "overlap.json").read_text())
    r = report["datasets"]["synthetic-test"]
    assert r["threshold"] == 0.0 and r["threshold_source"] == "manual"
    assert r["score"] == "verified"  # --verify auto: on with --detector
    assert r["n_overlap"] == N_TEST  # verified scores are in (0, 1]: all overlap
    assert r["acc_clean"] is None and r["p_value"] is None  # handled, no division error
    assert (out / "overlap.md").read_text().count("synthetic-test") == 1


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE)
    args = ["overlap", "--train", str(tmp_path / "none"), "--suite", str(suite)]
    assert main([*args, "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "clipops overlap: error:" in capsys.readouterr().err
    assert main(["overlap-detector", "--train", str(tmp_path), "--out", str(tmp_path / "d")]) == 2


def test_detector_roundtrip(corpus: dict[str, Any]) -> None:
    model = load_detector(corpus["detector"])
    meta = json.loads((corpus["detector"] / "detector.json").read_text())
    assert meta["train_images"] == N_TRAIN + len(PLANTED)
    assert meta["loss_last"] < meta["loss_first"]
    x = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    emb = model(x)
    assert emb.shape == (2, model.config.embed_dim)
    assert np.allclose(emb.norm(dim=-1).detach().numpy(), 1.0, atol=1e-5)


def test_mined_batches_are_nearest_neighbour_groups() -> None:
    """Online hard-negative mining: groups of an anchor and its nearest neighbours, no repeats."""
    emb = torch.nn.functional.normalize(
        torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    chosen = _mined_batch(emb, 24, 6, np.random.default_rng(0))
    assert chosen.shape == (24,) and np.unique(chosen).size == 24
    first = chosen[:6]  # the first anchor and the 5 images most similar to it
    sims = (emb @ emb[int(first[0])]).numpy()  # [50]
    outside = np.setdiff1d(np.arange(50), first)
    assert sims[first].min() >= sims[outside].max()


def test_training_with_mining_runs_and_validates() -> None:
    images = [s.image for s in generate(12, "train")]
    model_cfg = DetectorConfig(image_size=16, widths=(8,), grid=2, embed_dim=8)
    cfg = DetectorTrainConfig(model=model_cfg, steps=4, batch_size=8, mine_every=1, mine_warmup=1)
    model, losses = train_on_images(images, cfg)
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert not model.training
    with pytest.raises(DetectorError, match="mine_every"):
        DetectorTrainConfig(mine_every=-1)
