"""Registry pieces without MLflow: request parsing, headline metrics, the promotion rule."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from clip_eval.paired import PairedComparison, paired_bootstrap
from clip_registry.metrics import headline_metrics, overlap_summary
from clip_registry.promote import PromotionRule, RuleError, decide, version_metrics
from clip_registry.register import default_model_name
from clip_registry.request import DEFAULT_TEMPLATES, RequestError, parse_request

PNG = b"\x89PNG\r\n\x1a\n fake but non-empty"
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("ViT-B-32", "clip-vit-b32"),
        ("ViT-B-16", "clip-vit-b16"),
        ("ViT-L-14-336", "clip-vit-l14-336"),
        ("RN50x4", "clip-rn50x4"),
        ("tiny-vit", "clip-tiny-vit"),
        ("tiny-rn", "clip-tiny-rn"),
    ],
)
def test_default_model_name(model: str, name: str) -> None:
    assert default_model_name(model) == name


def test_parse_request_embed_mixed_rows() -> None:
    req = parse_request(
        {"image": [B64, PNG, None], "text": [None, "a dog", "a cat"]}, {"task": "embed"}
    )
    assert req.task == "embed" and req.rows == 3
    assert req.images == (PNG, PNG, None)
    assert req.texts == (None, "a dog", "a cat")
    nan = float("nan")  # how pandas fills a missing cell of dataframe_records
    req = parse_request({"image": [f"data:image/png;base64,{B64}"]}, None)
    assert req.images == (PNG,)
    req = parse_request({"text": ["x", "y"], "image": [nan, B64]}, None)
    assert req.images == (None, PNG) and req.texts == ("x", "y")


def test_parse_request_zero_shot_params() -> None:
    req = parse_request({"image": [B64]}, {"task": "zero_shot", "labels": [" dog ", "cat"]})
    assert req.labels == ("dog", "cat") and req.templates == DEFAULT_TEMPLATES
    req = parse_request(
        {"image": [B64]},
        {"task": "zero_shot", "labels": ["dog"], "templates": ["art of a {}.", "{}"]},
    )
    assert req.templates == ("art of a {}.", "{}")


@pytest.mark.parametrize(
    ("columns", "params", "message"),
    [
        ({"image": ["%%%"]}, None, "row 0: column 'image' is not valid base64"),
        ({"image": [B64, "abc"]}, None, "row 1: column 'image' is not valid base64"),
        ({"image": [""]}, None, "row 0: column 'image' is empty"),
        ({"image": [3]}, None, "must be bytes or a base64 string"),
        ({"text": [5]}, None, "row 0: column 'text' must be a string"),
        ({"caption": ["x"]}, None, "unknown input columns ['caption']"),
        ({}, None, "needs an 'image' column"),
        ({"text": []}, None, "no rows"),
        ({"image": [None], "text": [None]}, None, "rows [0] have neither"),
        ({"text": ["x"]}, {"task": "classify"}, "params.task must be one of"),
        ({"image": [B64]}, {"task": "zero_shot"}, "needs params.labels"),
        ({"image": [B64]}, {"task": "zero_shot", "labels": []}, "needs params.labels"),
        ({"image": [B64]}, {"task": "zero_shot", "labels": ["a", " "]}, "non-blank"),
        ({"image": [B64]}, {"task": "zero_shot", "labels": ["a", "a"]}, "duplicates: ['a']"),
        ({"image": [B64]}, {"task": "zero_shot", "labels": [1, 2]}, "list of strings"),
        (
            {"image": [B64]},
            {"task": "zero_shot", "labels": ["a"], "templates": ["no slot"]},
            "exactly once",
        ),
        ({"image": [None]}, {"task": "zero_shot", "labels": ["a"]}, "rows [0] have no image"),
        ({"image": [B64], "text": ["x"]}, {"task": "zero_shot", "labels": ["a"]}, "image' column"),
    ],
)
def test_parse_request_errors(
    columns: dict[str, list[object]], params: dict[str, object] | None, message: str
) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(columns, params)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def _record(dataset: str, task: str, metrics: dict[str, object]) -> dict[str, object]:
    return {"dataset": dataset, "task": task, "metrics": metrics}


def test_headline_metrics_from_eval_records() -> None:
    records = [
        _record("cifar", "zero_shot", {"top1": 0.5, "top5": 0.9}),
        _record("pets", "zero_shot", {"top1": 0.7}),
        _record("cifar", "linear_probe", {"top1": 0.8, "C": 1.0}),
        _record("cifar", "few_shot", {"ks": [1, 4], "mean_top1": [0.2, 0.4]}),
        _record("flickr", "retrieval", {"image_to_text_R@1": 0.3, "image_to_text_R@5": 0.6}),
        _record("shift", "robustness", {"zero_shot": {"id_top1": 0.6, "shift_top1": 0.4}}),
        _record("odd", "zero_shot", {"top1": None}),
        _record("s3://bucket/eval.parquet", "zero_shot", {"top1": 0.6}),
    ]
    m = headline_metrics(records)
    assert m["zero_shot/mean/top1"] == pytest.approx(0.6)
    assert m["linear_probe/mean/top1"] == pytest.approx(0.8)
    assert m["few_shot/cifar/top1_k4"] == 0.4
    assert m["retrieval/flickr/image_to_text_R1"] == 0.3
    assert not any("R5" in k or "R@" in k for k in m)
    assert m["zero_shot/s3_//bucket/eval.parquet/top1"] == 0.6
    assert all(re.fullmatch(r"[A-Za-z0-9_\-. /]+", k) for k in m)  # MLflow's key alphabet
    assert m["robustness/shift/shift_top1"] == 0.4
    assert not any(k.startswith("zero_shot/odd") for k in m)


@pytest.mark.parametrize(
    "report",
    [
        {"datasets": {"cifar": {"contamination": 0.02, "all_minus_clean": 0.001}}},
        {"cifar": {"contamination": 0.02, "all_minus_clean": 0.001}, "config": {"k": 1}},
        {"datasets": [{"dataset": "cifar", "contamination": 0.02, "all_minus_clean": 0.001}]},
        {"cifar": {"stats": {"contamination": 0.02, "all_minus_clean": 0.001}}},
    ],
)
def test_overlap_summary_shapes(report: object) -> None:
    assert overlap_summary(report) == {
        "cifar/all_minus_clean": 0.001,
        "cifar/contamination": 0.02,
        "max/contamination": 0.02,
    }


def test_overlap_summary_tolerates_junk() -> None:
    assert overlap_summary([1, 2]) == {}
    assert overlap_summary("nope") == {}
    assert overlap_summary({"a": {"contamination": None}}) == {}


def _comparison(gain: int, noise: int = 0, n: int = 2000) -> PairedComparison:
    """Paired outcomes on ``n`` examples, the champion right on the first half: the candidate
    is right on ``gain`` % more (or fewer) of them, and on ``noise`` examples each way it
    wins one the champion lost and loses one the champion won (no net change)."""
    base = np.zeros(n, dtype=np.int8)
    base[: n // 2] = 1
    cand = base.copy()
    k = abs(gain) * n // 100
    if gain > 0:
        cand[n // 2 : n // 2 + k] = 1
    elif gain < 0:
        cand[:k] = 0
    if noise:
        cand[n - noise :] = 1
        cand[n // 2 - noise : n // 2] = 0
    return paired_bootstrap({"d": (cand, base)}, resamples=2000)


def test_decide_on_paired_intervals() -> None:
    rule = PromotionRule(max_regression=0.02)
    first = decide({"zero_shot/mean/top1": 0.1}, None, rule)
    assert first.promote and "no champion" in first.reasons[0]
    assert not decide({}, None, PromotionRule(promote_first=False)).promote

    champ = {"zero_shot/mean/top1": 0.50, "zero_shot/a/top1": 0.6, "zero_shot/b/top1": 0.4}
    better = {"zero_shot/mean/top1": 0.55, "zero_shot/a/top1": 0.59, "zero_shot/b/top1": 0.51}
    gain = _comparison(5)
    v = decide(better, champ, rule, gain)
    assert v.promote and v.comparison is gain, v.reasons
    assert "significant gain" in v.reasons[0] and "95% CI" in v.reasons[0]

    # no paired evaluation: nothing is decided on point estimates
    pending = decide(better, champ, rule)
    assert pending.outcome == "pending" and "nightly" in pending.reasons[0]
    # a tie, and noise of either sign, keep the champion without a flag
    assert decide(champ, champ, rule, _comparison(0)).outcome == "reject"
    noisy = decide(better, champ, rule, _comparison(0, noise=30))
    assert noisy.outcome == "reject" and "no significant difference" in noisy.reasons[0]
    # a real gain smaller than the minimum effect is not promoted
    assert decide(better, champ, PromotionRule(min_improvement=0.1), gain).outcome == "reject"
    # a significant loss is flagged
    assert decide(champ, better, rule, _comparison(-5)).outcome == "regress"

    regress = {"zero_shot/mean/top1": 0.6, "zero_shot/a/top1": 0.5, "zero_shot/b/top1": 0.7}
    v = decide(regress, champ, rule, gain)
    assert v.outcome == "reject"
    assert any(r.startswith("zero_shot/a/top1 regressed") for r in v.reasons)
    assert decide(regress, champ, PromotionRule(max_regression=0.2), gain).promote
    wide = PromotionRule(guarded_prefixes=("linear_probe/",))
    assert decide(regress, champ, wide, gain).promote


def test_rule_from_specs(tmp_path: Path) -> None:
    f = tmp_path / "rule.yaml"
    f.write_text("primary_metric: zero_shot/cifar10/top1\nmax_regression: 0.05\n")
    rule = PromotionRule.from_specs([str(f), "min_improvement=0.01"])
    assert rule == PromotionRule("zero_shot/cifar10/top1", 0.01, 0.05)
    assert rule.paired_dataset() == "cifar10" and PromotionRule().paired_dataset() is None
    assert json.loads(rule.to_json())["max_regression"] == 0.05
    assert PromotionRule.from_specs(["guarded_prefixes=[zero_shot/]"]).guarded_prefixes == (
        "zero_shot/",
    )
    with pytest.raises(RuleError, match="unknown promotion rule keys"):
        PromotionRule.from_specs(["margin=0.1"])
    with pytest.raises(RuleError, match=">= 0"):
        PromotionRule.from_specs(["max_regression=-1"])
    with pytest.raises(RuleError, match="per-example results to pair"):
        PromotionRule.from_specs(["primary_metric=linear_probe/mean/top1"])
    with pytest.raises(RuleError, match=r"confidence must be >= 0\.5 and < 1"):
        PromotionRule.from_specs(["confidence=1.0"])
    with pytest.raises(RuleError, match="resamples must be >= 100"):
        PromotionRule.from_specs(["resamples=10"])
    with pytest.raises(RuleError, match="readable YAML"):
        PromotionRule.from_specs([str(tmp_path / "missing.yaml")])


def test_version_metrics_reads_metric_tags_only() -> None:
    tags = {
        "clipops.metric.zero_shot/a/top1": "0.25",
        "clipops.model": "x",
        "clipops.metric.b": "?",
    }
    assert version_metrics(tags) == {"zero_shot/a/top1": 0.25}


def test_serving_device_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from clip_registry.device import DEVICE_ENV, serving_device

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert serving_device() == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "bogus")
    with pytest.raises(ValueError, match="is not a torch device"):
        serving_device()
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    if torch.cuda.is_available():
        assert serving_device() == "cuda"
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            serving_device()
