"""Robustness to distribution shift: effective robustness and relative accuracy drop.

Pure functions: accuracies in, numbers out. Accuracies are fractions in [0, 1].

Effective robustness (Radford et al. 2021, following Taori et al. 2020): across a baseline
set of models, shifted accuracy follows a linear trend in logit space,
``logit(shift) = a * logit(in_distribution) + b``. A model's effective robustness is its
shifted accuracy minus the trend's prediction at its in-distribution accuracy (both as
accuracies, not logits): 0 for a model on the trend, positive above it. Accuracies of exactly
0 or 1 are clipped to [eps, 1 - eps] before the logit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

EPS = 1e-6


def logit(p: float, eps: float = EPS) -> float:
    """log(p / (1 - p)) with p clipped to [eps, 1 - eps]."""
    q = min(max(float(p), eps), 1.0 - eps)
    return math.log(q / (1.0 - q))


def sigmoid(x: float) -> float:
    """Inverse of :func:`logit`."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class LogitTrend:
    """``logit(shift) = slope * logit(id) + intercept``, fitted by least squares."""

    slope: float
    intercept: float

    def predict(self, id_acc: float) -> float:
        """Shifted accuracy the trend expects at in-distribution accuracy ``id_acc``."""
        return sigmoid(self.slope * logit(id_acc) + self.intercept)


def fit_logit_trend(id_accs: Sequence[float], shift_accs: Sequence[float]) -> LogitTrend:
    """Least-squares line through (logit(id), logit(shift)) of the baseline models.

    Needs at least two models with different in-distribution accuracies.
    """
    if len(id_accs) != len(shift_accs):
        raise ValueError(f"{len(id_accs)} in-distribution but {len(shift_accs)} shifted values")
    x = np.array([logit(a) for a in id_accs])
    y = np.array([logit(a) for a in shift_accs])
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("need >= 2 baseline models with different in-distribution accuracy")
    slope, intercept = np.polyfit(x, y, deg=1)
    return LogitTrend(float(slope), float(intercept))


def effective_robustness(
    results: Mapping[str, tuple[float, float]],
    *,
    baseline: Sequence[str] | None = None,
) -> tuple[dict[str, float], LogitTrend]:
    """Per model, shifted accuracy minus the baseline trend's prediction; and the trend.

    ``results`` maps a model name to its (in-distribution accuracy, shifted accuracy).
    ``baseline`` names the models the trend is fitted on (default: all of them, in which
    case the values measure each model against the population's own trend).
    """
    names = list(results) if baseline is None else list(baseline)
    missing = [n for n in names if n not in results]
    if missing:
        raise KeyError(f"baseline models without results: {missing}")
    trend = fit_logit_trend([results[n][0] for n in names], [results[n][1] for n in names])
    scores = {name: shift - trend.predict(iid) for name, (iid, shift) in results.items()}
    return scores, trend


def relative_accuracy_drop(id_acc: float, shift_acc: float) -> float:
    """(id - shift) / id: the fraction of in-distribution accuracy lost under shift."""
    if id_acc <= 0:
        raise ValueError(f"in-distribution accuracy must be > 0, got {id_acc}")
    return (id_acc - shift_acc) / id_acc
