"""Paired comparison of two models on the same examples: per-example outcomes, bootstrap CI.

A zero-shot record carries ``per_example``: ``ids`` (a digest of each test image's content,
so two evaluations pair up whatever order they saw the images in) and ``top1_correct``
(0/1 per image, the ensembled classifier's top-1). :func:`paired_outcomes` lines two sets of
records up by dataset and example id; :func:`paired_bootstrap` gives the difference of the
mean-over-datasets top-1 accuracy (candidate - champion) with a percentile bootstrap
confidence interval, resampling examples within each dataset (stratified), the same
examples for both models (paired).

For one dataset the per-example difference ``d = a - b`` is -1, 0 or +1, so a bootstrap
resample's mean is ``(n_plus - n_minus) / n`` with ``(n_minus, n_zero, n_plus)`` multinomial:
drawing the counts is exactly the bootstrap, in O(resamples) instead of O(resamples x n).
Pure: numbers in, numbers out.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

PER_EXAMPLE = "per_example"


class PairingError(ValueError):
    """Two evaluations cannot be paired: different datasets or different examples."""


def example_ids(images: Sequence[Image.Image | bytes]) -> list[str]:
    """A content id per image: 16 hex digits of its bytes (or PIL mode, size, pixels), with
    ``#k`` appended to the k-th repeat of an identical image so ids are unique."""
    seen: Counter[str] = Counter()
    out = []
    for image in images:
        h = hashlib.blake2b(digest_size=8)
        if isinstance(image, bytes):
            h.update(image)
        else:
            h.update(f"{image.mode}{image.size}".encode())
            h.update(image.tobytes())
        digest = h.hexdigest()
        out.append(digest if not seen[digest] else f"{digest}#{seen[digest]}")
        seen[digest] += 1
    return out


def per_example(ids: Sequence[str], logits: Any, labels: Sequence[int]) -> dict[str, Any]:
    """``{"ids", "top1_correct"}`` of logits [N, C] (array-like) against labels [N]."""
    predicted = np.asarray(logits).argmax(axis=1)  # [N]
    correct = (predicted == np.asarray(labels)).astype(int)  # [N]
    if len(ids) != len(correct):
        raise PairingError(f"{len(ids)} ids for {len(correct)} predictions")
    return {"ids": list(ids), "top1_correct": [int(c) for c in correct]}


def _outcomes(records: Sequence[Mapping[str, Any]], task: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if r.get("task") != task or not isinstance(r.get(PER_EXAMPLE), Mapping):
            continue
        pe = r[PER_EXAMPLE]
        out[str(r["dataset"])] = dict(zip(pe["ids"], pe["top1_correct"], strict=True))
    return out


def paired_outcomes(
    candidate: Sequence[Mapping[str, Any]],
    champion: Sequence[Mapping[str, Any]],
    task: str = "zero_shot",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per dataset, the candidate's and the champion's 0/1 outcomes on the same examples
    (``[n]`` each, in id order). Raises :class:`PairingError` unless both evaluated the same
    datasets on the same example ids."""
    a, b = _outcomes(candidate, task), _outcomes(champion, task)
    if not a or not b:
        who = "candidate" if not a else "champion"
        raise PairingError(f"the {who} has no per-example {task} results to pair")
    if set(a) != set(b):
        raise PairingError(f"different {task} datasets: {sorted(a)} vs {sorted(b)}")
    out = {}
    for dataset in sorted(a):
        if a[dataset].keys() != b[dataset].keys():
            only = len(a[dataset].keys() ^ b[dataset].keys())
            raise PairingError(f"{dataset}: {only} examples are in one evaluation only")
        ids = sorted(a[dataset])
        out[dataset] = (
            np.array([a[dataset][i] for i in ids], dtype=np.int8),
            np.array([b[dataset][i] for i in ids], dtype=np.int8),
        )
    return out


@dataclass(frozen=True)
class PairedComparison:
    """Candidate minus champion, mean-over-datasets top-1, with its bootstrap interval."""

    delta: float
    low: float
    high: float
    confidence: float
    examples: int
    datasets: tuple[str, ...]
    resamples: int

    def describe(self) -> str:
        """One line: the difference and its interval, in points."""
        return (
            f"{100 * self.delta:+.2f} points, {100 * self.confidence:.0f}% CI "
            f"[{100 * self.low:+.2f}, {100 * self.high:+.2f}] over {self.examples} paired "
            f"examples ({len(self.datasets)} datasets, {self.resamples} resamples)"
        )


def paired_bootstrap(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Stratified paired bootstrap of the mean-over-datasets accuracy difference."""
    if not pairs:
        raise PairingError("nothing to compare: no paired datasets")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)  # [R]
    delta = 0.0
    for a, b in pairs.values():
        d = a.astype(np.int64) - b.astype(np.int64)  # [n] in {-1, 0, 1}
        n = len(d)
        if n == 0:
            raise PairingError("a dataset with no examples cannot be compared")
        p = np.array([(d == -1).sum(), (d == 0).sum(), (d == 1).sum()]) / n
        counts = rng.multinomial(n, p, size=resamples)  # [R, 3]
        means += (counts[:, 2] - counts[:, 0]) / n
        delta += float(d.mean())
    k = len(pairs)
    means /= k
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedComparison(
        delta=delta / k,
        low=float(low),
        high=float(high),
        confidence=confidence,
        examples=sum(len(a) for a, _ in pairs.values()),
        datasets=tuple(sorted(pairs)),
        resamples=resamples,
    )
