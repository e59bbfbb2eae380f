"""Statistics of the data-overlap analysis (the paper's section 5). Pure: arrays in, numbers out.

Per evaluation dataset, a near-duplicate detector splits the examples into **Overlap** (a
match in the pretraining data above the threshold) and **Clean**; **All** is the unmodified
set. :func:`overlap_statistics` reports

* contamination = |Overlap| / |All|;
* zero-shot accuracy on All, Clean and Overlap, and the headline All - Clean;
* a one-sided (greater) exact binomial test of the Overlap successes against the Clean
  accuracy (H0: an overlapping example is classified correctly with probability acc_clean);
* a 99.5% Clopper-Pearson interval on the Clean accuracy.

:func:`bonferroni` corrects the p-values across the datasets analysed, and
:func:`precision_recall_curve` / :func:`choose_threshold` calibrate the detector's threshold
from planted copies. Empty subsets give ``None`` (never a division error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "OverlapStats",
    "PRCurve",
    "bonferroni",
    "choose_threshold",
    "clopper_pearson",
    "one_sided_binomial_p",
    "overlap_statistics",
    "precision_recall_at",
    "precision_recall_curve",
]

CLEAN_CI_LEVEL = 0.995


@dataclass(frozen=True)
class OverlapStats:
    """The analysis of one dataset. Accuracies are fractions in [0, 1]; ``None`` when empty."""

    n_all: int
    n_overlap: int
    n_clean: int
    correct_all: int
    correct_overlap: int
    correct_clean: int
    contamination: float | None
    acc_all: float | None
    acc_overlap: float | None
    acc_clean: float | None
    all_minus_clean: float | None
    overlap_minus_clean: float | None
    p_value: float | None
    clean_ci_99_5: tuple[float, float] | None

    def to_dict(self) -> dict[str, object]:
        """A JSON-able dict (the CI as a two-element list)."""
        out: dict[str, object] = dict(self.__dict__)
        out["clean_ci_99_5"] = None if self.clean_ci_99_5 is None else list(self.clean_ci_99_5)
        return out


def clopper_pearson(successes: int, n: int, level: float = CLEAN_CI_LEVEL) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a binomial proportion at ``level``.

    Raises ``ValueError`` for ``n == 0`` (no interval exists) or counts out of range.
    """
    _check_counts(successes, n)
    if n == 0:
        raise ValueError("a Clopper-Pearson interval needs at least one trial")
    alpha = 1.0 - level
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    high = (
        1.0
        if successes == n
        else float(stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    )
    return low, high


def one_sided_binomial_p(successes: int, n: int, p0: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p0): the one-sided (greater) exact test.

    ``n == 0`` gives 1.0 (no evidence). ``p0`` is clipped to [0, 1].
    """
    _check_counts(successes, n)
    if n == 0:
        return 1.0
    p0 = min(max(float(p0), 0.0), 1.0)
    return float(stats.binomtest(successes, n, p0, alternative="greater").pvalue)


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")


def overlap_statistics(
    correct: Sequence[bool] | np.ndarray, overlap: Sequence[bool] | np.ndarray
) -> OverlapStats:
    """Statistics of one dataset from per-example correctness and overlap flags [N].

    The binomial test compares Overlap's successes with the Clean accuracy; with an empty
    Clean subset there is no reference (``p_value`` is ``None``), with an empty Overlap subset
    the p-value is 1.0.
    """
    ok = np.asarray(correct, dtype=bool)  # [N]
    dup = np.asarray(overlap, dtype=bool)  # [N]
    if ok.shape != dup.shape or ok.ndim != 1:
        raise ValueError(f"correct {ok.shape} and overlap {dup.shape} must be equal 1-d shapes")
    n_all, n_overlap = int(ok.size), int(dup.sum())
    n_clean = n_all - n_overlap
    c_all, c_overlap = int(ok.sum()), int(ok[dup].sum())
    c_clean = c_all - c_overlap

    def frac(a: int, b: int) -> float | None:
        return a / b if b else None

    acc_all, acc_overlap, acc_clean = (
        frac(c_all, n_all),
        frac(c_overlap, n_overlap),
        frac(c_clean, n_clean),
    )
    p_value: float | None = None
    if acc_clean is not None:
        p_value = one_sided_binomial_p(c_overlap, n_overlap, acc_clean)
    return OverlapStats(
        n_all=n_all,
        n_overlap=n_overlap,
        n_clean=n_clean,
        correct_all=c_all,
        correct_overlap=c_overlap,
        correct_clean=c_clean,
        contamination=frac(n_overlap, n_all),
        acc_all=acc_all,
        acc_overlap=acc_overlap,
        acc_clean=acc_clean,
        all_minus_clean=None if acc_all is None or acc_clean is None else acc_all - acc_clean,
        overlap_minus_clean=(
            None if acc_overlap is None or acc_clean is None else acc_overlap - acc_clean
        ),
        p_value=p_value,
        clean_ci_99_5=clopper_pearson(c_clean, n_clean) if n_clean else None,
    )


def bonferroni(p_values: Sequence[float | None]) -> list[float | None]:
    """Bonferroni-corrected p-values: ``min(1, p * m)`` with m = the number of tests run.

    ``None`` entries (no test possible) are kept as ``None`` and do not count in m.
    """
    m = sum(p is not None for p in p_values)
    return [None if p is None else min(1.0, float(p) * m) for p in p_values]


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall of ``score >= threshold`` for every distinct score, descending."""

    thresholds: np.ndarray  # [T]
    precision: np.ndarray  # [T]
    recall: np.ndarray  # [T]
    positives: int
    negatives: int


def precision_recall_curve(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray
) -> PRCurve:
    """The precision/recall curve of predicting ``label`` by ``score >= threshold``.

    Thresholds are the distinct scores, highest first; ties are counted together.
    """
    s = np.asarray(scores, dtype=np.float64)  # [N]
    y = np.asarray(labels, dtype=bool)  # [N]
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be equal 1-d shapes")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)  # [N]
    fp = np.cumsum(~y)  # [N]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1] if s.size else np.array([], int)
    positives = int(y.sum())
    tps, fps = tp[last], fp[last]
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / positives if positives else np.zeros_like(precision, dtype=np.float64)
    return PRCurve(
        s[last], precision.astype(np.float64), recall.astype(np.float64), positives, int((~y).sum())
    )


def choose_threshold(curve: PRCurve, min_precision: float = 0.95) -> float:
    """The highest threshold reaching the best recall attainable at precision >= ``min_precision``.

    Lowering the threshold further would only add false positives, so among the thresholds
    with that recall the highest one is kept. When no threshold reaches the precision, the
    one with the best precision (then recall); an empty curve gives +inf (nothing flagged).
    """
    if curve.thresholds.size == 0:
        return float("inf")
    ok = np.flatnonzero(curve.precision >= min_precision)
    if ok.size:
        best_recall = curve.recall[ok].max()
        first = ok[np.flatnonzero(curve.recall[ok] >= best_recall)[0]]
        return float(curve.thresholds[first])
    best = np.lexsort((-curve.recall, -curve.precision))[0]
    return float(curve.thresholds[best])


def precision_recall_at(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray, threshold: float
) -> tuple[float | None, float | None]:
    """(precision, recall) of ``score >= threshold``; ``None`` where undefined (0/0)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    flagged = s >= threshold
    tp = int((flagged & y).sum())
    n_flagged, n_pos = int(flagged.sum()), int(y.sum())
    return (tp / n_flagged if n_flagged else None, tp / n_pos if n_pos else None)
