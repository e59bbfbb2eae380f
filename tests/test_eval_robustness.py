"""Effective robustness on a logit-linear trend; relative accuracy drop."""

from __future__ import annotations

import math

import pytest

from clip_core.robustness import (
    LogitTrend,
    effective_robustness,
    fit_logit_trend,
    logit,
    relative_accuracy_drop,
    sigmoid,
)

TRUE = LogitTrend(slope=0.8, intercept=-1.0)


def on_trend(id_acc: float) -> float:
    return sigmoid(TRUE.slope * logit(id_acc) + TRUE.intercept)


def test_fit_recovers_trend() -> None:
    ids = [0.3, 0.5, 0.7, 0.9]
    trend = fit_logit_trend(ids, [on_trend(a) for a in ids])
    assert trend.slope == pytest.approx(0.8, abs=1e-9)
    assert trend.intercept == pytest.approx(-1.0, abs=1e-9)
    assert trend.predict(0.6) == pytest.approx(on_trend(0.6))


def test_effective_robustness_zero_on_trend_positive_above() -> None:
    results = {f"base{i}": (a, on_trend(a)) for i, a in enumerate([0.3, 0.5, 0.7, 0.9])}
    results["robust"] = (0.6, on_trend(0.6) + 0.1)
    results["fragile"] = (0.8, on_trend(0.8) - 0.05)
    results["on"] = (0.4, on_trend(0.4))
    scores, trend = effective_robustness(results, baseline=[f"base{i}" for i in range(4)])
    for name in ("base0", "base1", "base2", "base3", "on"):
        assert scores[name] == pytest.approx(0.0, abs=1e-9)
    assert scores["robust"] == pytest.approx(0.1, abs=1e-9)
    assert scores["fragile"] == pytest.approx(-0.05, abs=1e-9)
    assert trend.slope == pytest.approx(0.8)
    # a linear (not logit) fit would not put these models exactly on the trend
    assert abs(on_trend(0.5) - (on_trend(0.3) + on_trend(0.7)) / 2) > 1e-3


def test_default_baseline_and_errors() -> None:
    results = {"a": (0.5, 0.4), "b": (0.7, 0.5)}
    scores, _ = effective_robustness(results)
    assert scores["a"] == pytest.approx(0.0, abs=1e-9)  # two points: the line goes through both
    with pytest.raises(KeyError):
        effective_robustness(results, baseline=["a", "zzz"])
    with pytest.raises(ValueError):
        fit_logit_trend([0.5, 0.5], [0.3, 0.4])
    assert math.isfinite(logit(1.0)) and math.isfinite(logit(0.0))


def test_relative_drop() -> None:
    assert relative_accuracy_drop(0.8, 0.6) == pytest.approx(0.25)
    assert relative_accuracy_drop(0.5, 0.6) == pytest.approx(-0.2)
    with pytest.raises(ValueError):
        relative_accuracy_drop(0.0, 0.1)
