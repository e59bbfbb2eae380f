"""MLflow metric names for evaluation records (clip_eval.metrics): stable, unique, readable."""

from __future__ import annotations

from typing import Any

import pytest

from clip_eval.metrics import c_label, eval_metrics, metric_key


def _record(dataset: str, task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": dataset, "task": task, "metrics": metrics}


def test_eval_metrics_keeps_finite_scalars_with_stable_names() -> None:
    records = [
        _record("synthetic-test", "zero_shot", {"top1": 0.75, "ensembling": {"bare_top1": 0.5}}),
        _record("digits", "few_shot", {"ks": [1, 2], "mean_top1": [0.1, 0.2], "c": None}),
        _record("tux", "retrieval", {"image_R@1": 0.25, "bad": float("nan"), "flag": True}),
    ]
    assert eval_metrics(records) == {
        "transfer/synthetic-test/zero_shot/top1": 0.75,
        "transfer/synthetic-test/zero_shot/ensembling/bare_top1": 0.5,
        "transfer/tux/retrieval/image_R_1": 0.25,
    }
    assert metric_key("transfer", "a:b", "c") == "transfer/a_b/c"


def test_probe_c_names_are_unambiguous() -> None:
    """C=1e+06 and C=1e-06 get names that neither collide nor read alike after MLflow's
    character rules (no ``+``, no zero-padded exponent)."""
    grid = [1e-6, 1e-4, 0.01, 1.0, 100.0, 1e4, 1e6, 316.2277, 3.16e-5]
    names = [c_label(c) for c in grid]
    assert names == [
        "C_1e-6", "C_0.0001", "C_0.01", "C_1", "C_100", "C_10000", "C_1e6", "C_316.228", "C_3.16e-5"
    ]  # fmt: skip
    assert all(metric_key(n) == n for n in names)  # nothing left for MLflow to rewrite


def test_two_record_paths_that_share_a_name_are_an_error() -> None:
    """``a:b`` and ``a_b`` map to one MLflow name: an error naming both, not an overwrite."""
    records = [_record(name, "zero_shot", {"top1": 0.5}) for name in ("a:b", "a_b")]
    with pytest.raises(ValueError, match=r"transfer/a_b/zero_shot/top1.*'a:b/.*'a_b/"):
        eval_metrics(records)
    with pytest.raises(ValueError, match=r"record 0 .*record 1"):
        eval_metrics([records[0], records[0]])
