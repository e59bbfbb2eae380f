"""What an overlap figure may be published as (clip_overlap.status), unit and end to end.

The issue's case: a purely synthetic training corpus against Fashion-MNIST test images, no
calibrated detector (CLIP tower, verification off). Whatever the cosine threshold lets
through are unverified candidates: the published contamination (report, registry tags,
the flows' table) is the exact duplicates only, here 0.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from clip_core import create_model
from clip_core.checkpoint import save_checkpoint
from clip_core.synthetic import generate
from clip_core.tokenizer import ClipTokenizer
from clip_data.ingest import IngestConfig, ingest
from clip_overlap.pipeline import OverlapConfig, run_overlap
from clip_overlap.status import (
    CALIBRATED,
    MIXED,
    UNVERIFIED,
    VERIFIED,
    counts_as_contamination,
    dataset_status,
    published,
    report_status,
)
from clip_registry.register import overlap_tags
from flows.summaries import overlap_rows

N_FASHION = 120
SUITE = f"""
name: fashion-overlap
tasks:
  - dataset: fashion-mnist-test
    task: zero_shot
    dataset_options: {{n_train: 1, n_test: {N_FASHION}}}
"""
pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ----------------------------------------------------------------------------- unit


def test_status_order_calibrated_then_verified_then_unverified() -> None:
    assert dataset_status("planted-in-shards", "cosine", 0.97, 0.95) == CALIBRATED
    assert dataset_status("planted-in-shards", "cosine", None, 0.95) == CALIBRATED
    assert dataset_status("planted-in-shards", "verified", 0.5, 0.95) == VERIFIED
    assert dataset_status("simulated", "verified", None, 0.95) == VERIFIED
    assert dataset_status("simulated", "cosine", None, 0.95) == UNVERIFIED
    low = dataset_status("planted-in-shards", "cosine", 0.83, 0.95)
    assert low.startswith("unverified") and "0.83" in low and "0.95" in low
    assert counts_as_contamination(CALIBRATED) and counts_as_contamination(VERIFIED)
    assert not counts_as_contamination(UNVERIFIED) and not counts_as_contamination(low)


def test_report_status_is_the_common_one_else_mixed() -> None:
    assert report_status([VERIFIED, VERIFIED]) == VERIFIED
    assert report_status([VERIFIED, UNVERIFIED]) == MIXED
    assert report_status([]) == UNVERIFIED


def test_an_old_cosine_simulated_record_publishes_its_exact_duplicates_only() -> None:
    """A record written before statuses existed counted its unverified candidates."""
    old = {"score": "cosine", "calibration": "simulated", "n_all": 1000, "n_overlap": 17}
    old |= {"exact_duplicates": 2, "contamination": 0.017, "all_minus_clean": 0.004}
    shown = published(old)
    assert shown.status == UNVERIFIED
    assert shown.n_overlap == 2 and shown.contamination == pytest.approx(0.002)
    assert shown.all_minus_clean is None and not shown.split_stats
    assert shown.unverified_candidates == 15


def test_records_of_trustworthy_or_unknown_detections_are_taken_as_they_are() -> None:
    verified = {"score": "verified", "calibration": "simulated", "n_all": 100, "n_overlap": 5}
    verified |= {"contamination": 0.05, "all_minus_clean": 0.01}
    assert published(verified).contamination == 0.05 and published(verified).status == VERIFIED
    current = {"status": UNVERIFIED, "n_overlap": 0, "contamination": 0.0}
    current |= {"unverified_candidates": 9}
    assert published(current).unverified_candidates == 9 and published(current).contamination == 0
    foreign = {"contamination": 0.3, "n_overlap": 3}
    assert published(foreign).status is None and published(foreign).contamination == 0.3
    assert published({"contamination": float("nan")}).contamination is None


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synthetic_vs_fashion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("overlap-status")
    ingest("synthetic", root / "train", IngestConfig(workers=1), train=300, test=10)
    torch.manual_seed(0)
    tok = ClipTokenizer.train([s.caption for s in generate(100, "train")], 600, context_length=48)
    text = {"vocab_size": tok.vocab_size, "context_length": 48}  # Fashion-MNIST's prompts
    model = create_model("tiny-vit", text=text, vision={"image_size": 64})
    suite = root / "suite.yaml"
    suite.write_text(SUITE)
    return {"root": root, "ckpt": save_checkpoint(model, root / "clip", tok), "suite": suite}


def _run(corpus: dict[str, Any], **config: Any) -> dict[str, Any]:
    return run_overlap(
        str(corpus["root"] / "train"),
        corpus["suite"],
        corpus["ckpt"],
        embedding="clip",
        config=OverlapConfig(verify="off", **config),
    )


def test_unverified_candidates_are_never_published_as_contamination(
    synthetic_vs_fashion: dict[str, Any],
) -> None:
    """Threshold -1 puts every Fashion-MNIST image above the cosine threshold: a detector
    without calibration would report 100% contamination of a corpus that shares nothing."""
    report = _run(synthetic_vs_fashion, threshold=-1.0)
    r = report["datasets"]["fashion-mnist-test"]
    assert r["status"] == UNVERIFIED and report["status"] == UNVERIFIED
    assert r["exact_duplicates"] == 0
    assert r["n_overlap"] == 0 and r["contamination"] == 0.0 and r["n_clean"] == N_FASHION
    assert r["unverified_candidates"] == N_FASHION
    assert report["summary"]["unverified_datasets"] == ["fashion-mnist-test"]
    assert report["summary"]["unverified_candidates"] == N_FASHION

    tags = overlap_tags(report)
    assert float(tags["clipops.overlap.fashion-mnist-test/contamination"]) == 0.0
    assert float(tags["clipops.overlap.max/contamination"]) == 0.0
    assert tags["clipops.overlap.status"] == UNVERIFIED
    assert tags["clipops.overlap.fashion-mnist-test/status"] == UNVERIFIED
    (row,) = overlap_rows(report)
    assert row["contamination (%)"] == 0.0 and row["overlap"] == 0
    assert row["unverified candidates (not counted)"] == N_FASHION
    assert row["status"] == UNVERIFIED


def test_the_calibrated_threshold_without_verification_counts_nothing_either(
    synthetic_vs_fashion: dict[str, Any],
) -> None:
    """The issue's run as it was: the threshold from simulated copies, verification off."""
    report = _run(synthetic_vs_fashion)
    r = report["datasets"]["fashion-mnist-test"]
    assert r["calibration"] == "simulated" and r["score"] == "cosine"
    assert r["status"] == UNVERIFIED
    assert r["n_overlap"] == r["exact_duplicates"] == 0 and r["contamination"] == 0.0
    assert r["n_overlap"] + r["n_clean"] == r["n_all"] == N_FASHION
    print(f"unverified candidates at the simulated threshold: {r['unverified_candidates']}")


def test_tags_of_a_report_without_datasets_say_so() -> None:
    tags = overlap_tags({"datasets": {}})
    assert tags == {"clipops.overlap.status": "no per-dataset contamination found in the report"}
