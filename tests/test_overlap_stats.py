"""Overlap statistics against scipy on hand-made counts; empty subsets; calibration curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from clip_core.overlap_stats import (
    bonferroni,
    choose_threshold,
    clopper_pearson,
    one_sided_binomial_p,
    overlap_statistics,
    precision_recall_at,
    precision_recall_curve,
)


def _flags(
    n_overlap: int, c_overlap: int, n_clean: int, c_clean: int
) -> tuple[list[bool], list[bool]]:
    """Per-example (correct, overlap) lists with the given counts, interleaved."""
    overlap = [True] * n_overlap + [False] * n_clean
    correct = [i < c_overlap for i in range(n_overlap)] + [i < c_clean for i in range(n_clean)]
    order = np.random.default_rng(0).permutation(len(overlap))
    return [correct[i] for i in order], [overlap[i] for i in order]


@pytest.mark.parametrize(
    ("n_overlap", "c_overlap", "n_clean", "c_clean"),
    [(12, 11, 88, 60), (3, 1, 400, 390), (40, 40, 9, 0)],
)
def test_statistics_agree_with_scipy(
    n_overlap: int, c_overlap: int, n_clean: int, c_clean: int
) -> None:
    correct, overlap = _flags(n_overlap, c_overlap, n_clean, c_clean)
    s = overlap_statistics(correct, overlap)
    n_all = n_overlap + n_clean
    assert (s.n_all, s.n_overlap, s.n_clean) == (n_all, n_overlap, n_clean)
    assert s.contamination == pytest.approx(n_overlap / n_all)
    acc_clean = c_clean / n_clean
    assert s.acc_clean == pytest.approx(acc_clean)
    assert s.acc_overlap == pytest.approx(c_overlap / n_overlap)
    assert s.acc_all == pytest.approx((c_overlap + c_clean) / n_all)
    assert s.all_minus_clean == pytest.approx((c_overlap + c_clean) / n_all - acc_clean)
    expected_p = stats.binom.sf(c_overlap - 1, n_overlap, acc_clean)  # P(X >= c_overlap)
    assert s.p_value == pytest.approx(expected_p, rel=1e-9, abs=1e-15)
    ci = stats.binomtest(c_clean, n_clean).proportion_ci(confidence_level=0.995, method="exact")
    assert s.clean_ci_99_5 == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_one_sided_binomial_matches_binomtest() -> None:
    for k, n, p in [(5, 10, 0.3), (0, 7, 0.5), (9, 9, 0.99), (1, 50, 0.01)]:
        expected = stats.binomtest(k, n, p, alternative="greater").pvalue
        assert one_sided_binomial_p(k, n, p) == pytest.approx(expected)
    assert one_sided_binomial_p(0, 0, 0.5) == 1.0
    with pytest.raises(ValueError, match="successes"):
        one_sided_binomial_p(4, 3, 0.5)


def test_clopper_pearson_edges_and_level() -> None:
    low, high = clopper_pearson(0, 20)
    assert low == 0.0
    assert high == pytest.approx(1 - (0.0025) ** (1 / 20))  # closed form at k = 0
    low, high = clopper_pearson(20, 20)
    assert high == 1.0
    assert low == pytest.approx((0.0025) ** (1 / 20))
    wide, narrow = clopper_pearson(30, 60), clopper_pearson(30, 60, level=0.9)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    with pytest.raises(ValueError, match="at least one trial"):
        clopper_pearson(0, 0)


def test_no_overlap_dataset_has_no_division_error() -> None:
    s = overlap_statistics([True, False, True, True], [False] * 4)
    assert s.contamination == 0.0 and s.n_overlap == 0
    assert s.acc_overlap is None and s.overlap_minus_clean is None
    assert s.all_minus_clean == 0.0
    assert s.p_value == 1.0  # no overlapping example: no evidence of inflation
    assert s.clean_ci_99_5 is not None


def test_all_overlap_dataset_has_no_division_error() -> None:
    s = overlap_statistics([True, False, True], [True] * 3)
    assert s.contamination == 1.0 and s.n_clean == 0
    assert s.acc_clean is None and s.all_minus_clean is None and s.p_value is None
    assert s.clean_ci_99_5 is None
    assert s.acc_overlap == pytest.approx(2 / 3)
    assert s.to_dict()["clean_ci_99_5"] is None


def test_empty_dataset() -> None:
    s = overlap_statistics([], [])
    assert s.n_all == 0 and s.contamination is None and s.acc_all is None
    with pytest.raises(ValueError, match="shapes"):
        overlap_statistics([True], [True, False])


def test_bonferroni_counts_only_tests_run() -> None:
    assert bonferroni([0.01, None, 0.3]) == [0.02, None, 0.6]
    assert bonferroni([0.5, 0.6, 0.01]) == [1.0, 1.0, 0.03]
    assert bonferroni([]) == []


def test_precision_recall_curve_and_threshold() -> None:
    scores = [0.99, 0.97, 0.95, 0.95, 0.90, 0.80, 0.70]
    labels = [True, True, True, False, True, False, False]
    curve = precision_recall_curve(scores, labels)
    assert curve.thresholds.tolist() == [0.99, 0.97, 0.95, 0.90, 0.80, 0.70]
    # at 0.95 the tie counts together: 3 TP + 1 FP
    assert curve.precision.tolist() == pytest.approx([1, 1, 0.75, 0.8, 4 / 6, 4 / 7])
    assert curve.recall.tolist() == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert choose_threshold(curve, 0.95) == 0.97
    assert choose_threshold(curve, 0.8) == 0.90  # the highest threshold with the best recall
    p, r = precision_recall_at(scores, labels, 0.90)
    assert (p, r) == (0.8, 1.0)
    assert precision_recall_at(scores, labels, 2.0) == (None, 0.0)


def test_threshold_of_separable_scores_is_the_lowest_positive() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.uniform(0.9, 1.0, 50), rng.uniform(0.2, 0.85, 500)
    scores = np.r_[pos, neg]
    labels = np.r_[np.ones(50, bool), np.zeros(500, bool)]
    t = choose_threshold(precision_recall_curve(scores, labels), 0.95)
    assert t == pytest.approx(pos.min())
    assert precision_recall_at(scores, labels, t) == (1.0, 1.0)
    assert math.isinf(choose_threshold(precision_recall_curve([], []), 0.95))
