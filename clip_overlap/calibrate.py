"""Per-dataset threshold calibration from planted augmented copies.

Two sources of labelled (score, is-duplicate) pairs, in order of preference (the score is
the detector's cosine, or with verification on the verified score of
:mod:`clip_overlap.verify`, for positives and negatives alike):

* ``planted-in-shards``: the pretraining shards contain planted near-copies of evaluation
  examples (rows with ``extra.planted_from`` naming the key of the copied row, as the
  synthetic corpus' ``plant=`` option writes them). Every evaluation example is labelled
  by whether a copy of it was planted, and scored by its top-1 similarity to the
  pretraining set: the real detection problem, with real negatives.
* ``simulated``: no ground truth in the shards. Every evaluation example (up to
  ``copies``) gets one augmented copy (:func:`clip_core.synthetic.near_duplicate`, never seen
  by the detector's training) whose similarity to the original is a positive score; the
  negatives are the examples' top-1 similarities to the pretraining set. Real overlaps
  among those negatives count as false positives, so the precision is a lower bound.

The threshold is the highest one reaching the best recall attainable at
``min_precision`` (:func:`clip_core.overlap_stats.choose_threshold`); a hand-set
threshold overrides it and is reported with the precision and recall it has on the same
labelled pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_core.overlap_stats import (
    PRCurve,
    choose_threshold,
    precision_recall_at,
    precision_recall_curve,
)
from clip_overlap.embed import Embedder, ImageLike, embed_all, to_pil
from clip_overlap.verify import VerifyConfig, load_pixels, verify_pairs


@dataclass(frozen=True)
class Calibration:
    """The chosen threshold, where it came from, and its precision/recall on labelled pairs."""

    mode: str
    threshold: float
    source: str
    precision: float | None
    recall: float | None
    curve: PRCurve

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the curve is written separately)."""
        return {
            "calibration": self.mode,
            "threshold": self.threshold,
            "threshold_source": self.source,
            "precision": self.precision,
            "recall": self.recall,
            "positives": self.curve.positives,
            "negatives": self.curve.negatives,
        }


def simulated_pairs(
    embedder: Embedder,
    images: Sequence[ImageLike],
    queries: np.ndarray,
    top1: np.ndarray,
    *,
    copies: int,
    seed: int,
    verifier: VerifyConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores [P + N] and labels of simulated planting (see the module docstring).

    With ``verifier`` the positives are verified scores of (original, copy) pairs
    (:func:`clip_overlap.verify.verify_pairs`), to match ``top1`` being verified scores.
    """
    from clip_core.synthetic import near_duplicate

    n = len(images)
    chosen = np.random.default_rng(seed).permutation(n)[: min(copies, n)]
    made = [near_duplicate(to_pil(images[int(i)]), seed=seed * 1_000_003 + int(i)) for i in chosen]
    if verifier is None:
        emb = embed_all(embedder, made)  # [P, D]
        positives = np.einsum("pd,pd->p", emb, queries[chosen])  # [P]
    else:
        originals = load_pixels([images[int(i)] for i in chosen], verifier.size)  # [P, 3, S, S]
        copied = load_pixels(made, verifier.size)  # [P, 3, S, S]
        positives = verify_pairs(originals, copied, verifier).numpy().astype(np.float64)  # [P]
    negatives = np.asarray(top1, dtype=np.float64)  # [N]
    scores = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(len(chosen), bool), np.zeros(n, bool)])
    return scores, labels


def calibrate(
    scores: np.ndarray,
    labels: np.ndarray,
    mode: str,
    *,
    min_precision: float,
    manual: float | None,
) -> Calibration:
    """Choose (or take) the threshold and measure it on labelled ``scores``."""
    finite = np.where(np.isfinite(scores), scores, -1.0)
    curve = precision_recall_curve(finite, labels)
    threshold = choose_threshold(curve, min_precision) if manual is None else float(manual)
    precision, recall = precision_recall_at(finite, labels, threshold)
    source = "calibrated" if manual is None else "manual"
    return Calibration(mode, threshold, source, precision, recall, curve)
