"""Linear and few-shot probes on frozen features (the paper's representation-learning eval).

Pure functions: feature arrays in, metrics out. The classifier is scikit-learn's
``LogisticRegression`` with the L-BFGS solver (multinomial for more than two classes, the
only multi-class mode lbfgs has in current scikit-learn) and an L2 penalty of strength
``1 / C``.

C selection (:func:`sweep_c`): a coarse log grid over 1e-6..1e6 (default: every two decades,
7 fits), then ``refine_rounds`` rounds of a bisection in log space around the best C (each
round halves the step and tries best * 10**(+-step)), like CLIP_benchmark. The best C is the
one with the highest validation accuracy; ties go to the smaller C (stronger regularisation).
The final model is refit on train + validation with that C and scored on the test set.

Standardisation: with ``standardize=True`` (the default) features are z-scored with the mean
and standard deviation of the data the model is fitted on (train for the sweep, train + val
for the refit) and the same transform is applied to the evaluated split. It changes nothing
about what a linear model can express but makes L-BFGS converge in far fewer iterations and
makes one C grid fit any feature scale. ``standardize=False`` feeds raw features (the
paper's released probe code does that).

Few-shot (:func:`few_shot_probe`): for each k and seed, k training examples per class are
drawn at random; C is either fixed by the caller or swept on the caller's validation split
(which is then more labelled data than k per class: an upper bound on a truly few-shot
probe, and what one does when only the representation is under study).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]
ArrayLike = npt.ArrayLike | torch.Tensor

COARSE_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-6, 7, 2))
C_MIN, C_MAX = 1e-6, 1e6
FEW_SHOT_KS: tuple[int, ...] = (1, 2, 4, 8, 16)


class FeatureModel(Protocol):
    """CLIP's two image outputs: pooled features [B, W] and projected embeddings [B, D]."""

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features before the projection."""
        ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings after the projection."""
        ...


@torch.no_grad()
def extract_features(
    model: FeatureModel,
    images: Iterable[torch.Tensor],
    *,
    projected: bool = False,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Frozen image features [N, F] on CPU, one batch [B, 3, R, R] in memory at a time.

    ``projected=False`` (the paper's choice) takes the pooled features before the
    projection; ``projected=True`` the (unnormalised) embeddings after it. The model is put
    in eval mode for the call and its previous mode restored.
    """
    was_training = bool(getattr(model, "training", False))
    set_mode = getattr(model, "train", None)
    if callable(set_mode):
        set_mode(False)
    encode = model.encode_image if projected else model.image_features
    try:
        chunks = []
        for batch in images:
            chunks.append(encode(batch.to(device)).float().cpu())  # [B, F]
            if on_batch is not None:
                on_batch(batch.shape[0])
    finally:
        if callable(set_mode):
            set_mode(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)  # [N, F]


def _array(x: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class Standardizer:
    """z-score with statistics of the fit data (identity when disabled)."""

    def __init__(self, x: FloatArray, enabled: bool) -> None:
        self.mean = x.mean(axis=0) if enabled else np.zeros(x.shape[1])  # [F]
        std = x.std(axis=0) if enabled else np.ones(x.shape[1])  # [F]
        self.std = np.where(std > 0, std, 1.0)  # [F]

    def __call__(self, x: FloatArray) -> FloatArray:
        return (x - self.mean) / self.std  # [N, F]


def fit_logistic(
    x: ArrayLike, y: ArrayLike, *, c: float, max_iter: int = 1000, standardize: bool = True
) -> tuple[LogisticRegression, Standardizer]:
    """Fit L2 logistic regression (lbfgs) on features x [N, F] and labels y [N]."""
    xa, ya = _array(x), _array(y, np.int64)
    scaler = Standardizer(xa, standardize)
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler(xa), ya)
    return clf, scaler


def probe_metrics(
    clf: LogisticRegression, scaler: Standardizer, x: ArrayLike, y: ArrayLike
) -> dict[str, float]:
    """``top1``, ``top5`` (with >= 5 classes) and ``mean_per_class_recall`` on (x, y)."""
    from clip_core.zeroshot import classification_metrics

    scores = clf.decision_function(scaler(_array(x)))  # [N, C] (or [N] for two classes)
    if scores.ndim == 1:
        scores = np.stack([-scores, scores], axis=1)  # [N, 2]
    # map column j to class label clf.classes_[j]: scatter into a dense [N, max_label+1]
    ya = _array(y, np.int64)
    n_cols = int(max(clf.classes_.max(), ya.max())) + 1
    dense = np.full((scores.shape[0], n_cols), -np.inf)  # [N, K]
    dense[:, clf.classes_] = scores
    return classification_metrics(torch.from_numpy(dense), torch.from_numpy(ya))


def _val_accuracy(
    data: tuple[FloatArray, IntArray, FloatArray, IntArray],
    c: float,
    max_iter: int,
    standardize: bool,
) -> float:
    xt, yt, xv, yv = data
    clf, scaler = fit_logistic(xt, yt, c=c, max_iter=max_iter, standardize=standardize)
    return float((clf.predict(scaler(xv)) == yv).mean())


def _best(sweep: dict[float, float]) -> float:
    return min(sweep, key=lambda c: (-sweep[c], c))


def sweep_c(
    train_x: ArrayLike,
    train_y: ArrayLike,
    val_x: ArrayLike,
    val_y: ArrayLike,
    *,
    coarse_grid: Sequence[float] = COARSE_GRID,
    refine_rounds: int = 3,
    max_iter: int = 1000,
    standardize: bool = True,
) -> tuple[float, dict[float, float]]:
    """The best C on the validation split and the whole sweep {C: validation accuracy}.

    Coarse grid first, then ``refine_rounds`` log-space bisection rounds around the best
    (clipped to [1e-6, 1e6]). See the module docstring for the tie rule.
    """
    if not coarse_grid:
        raise ValueError("coarse_grid is empty")
    data = (_array(train_x), _array(train_y, np.int64), _array(val_x), _array(val_y, np.int64))
    sweep: dict[float, float] = {}
    for c in sorted(coarse_grid):
        sweep[float(c)] = _val_accuracy(data, float(c), max_iter, standardize)
    grid = sorted(coarse_grid)
    step = (math.log10(grid[-1]) - math.log10(grid[0])) / max(len(grid) - 1, 1)
    for _ in range(refine_rounds):
        step /= 2
        best = _best(sweep)
        for sign in (-1.0, 1.0):
            c = float(min(max(best * 10.0 ** (sign * step), C_MIN), C_MAX))
            if c not in sweep:
                sweep[c] = _val_accuracy(data, c, max_iter, standardize)
    return _best(sweep), dict(sorted(sweep.items()))


def stratified_split(
    labels: ArrayLike, *, fraction: float = 0.2, seed: int = 0
) -> tuple[IntArray, IntArray]:
    """Indices (train, val): ``fraction`` of each class (at least one, when the class has 2+)
    goes to validation."""
    y = _array(labels, np.int64)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(max(1, round(fraction * len(idx))), len(idx) - 1) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass(frozen=True)
class ProbeResult:
    """Chosen C, the sweep {C: val accuracy}, and test metrics of the train+val refit."""

    C: float
    sweep: dict[float, float]
    metrics: dict[str, float]


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    val_x: ArrayLike | None = None,
    val_y: ArrayLike | None = None,
    val_fraction: float = 0.2,
    coarse_grid: Sequence[float] = COARSE_GRID,
    refine_rounds: int = 3,
    max_iter: int = 1000,
    standardize: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """Sweep C on validation, refit on train + validation, report test metrics.

    Features are [N, F] arrays or tensors, labels [N] ints. Without ``val_x``/``val_y`` a
    stratified ``val_fraction`` of the training data (seeded) is the validation split.
    """
    xtr, ytr = _array(train_x), _array(train_y, np.int64)
    if (val_x is None) != (val_y is None):
        raise ValueError("pass both val_x and val_y, or neither")
    if val_x is None or val_y is None:
        tr, va = stratified_split(ytr, fraction=val_fraction, seed=seed)
        xtr, ytr, xva, yva = xtr[tr], ytr[tr], xtr[va], ytr[va]
    else:
        xva, yva = _array(val_x), _array(val_y, np.int64)
    best, sweep = sweep_c(
        xtr,
        ytr,
        xva,
        yva,
        coarse_grid=coarse_grid,
        refine_rounds=refine_rounds,
        max_iter=max_iter,
        standardize=standardize,
    )
    x_all, y_all = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    clf, scaler = fit_logistic(x_all, y_all, c=best, max_iter=max_iter, standardize=standardize)
    return ProbeResult(best, sweep, probe_metrics(clf, scaler, test_x, test_y))


def sample_k_shot(labels: ArrayLike, k: int, *, seed: int) -> IntArray:
    """Sorted indices of k random examples per class (all of a class that has fewer)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    y = _array(labels, np.int64)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


@dataclass(frozen=True)
class FewShotResult:
    """Per k: test top-1 per seed, their mean and standard deviation (ddof=0)."""

    ks: tuple[int, ...]
    accuracies: dict[int, list[float]]
    C: dict[int, list[float]] = field(default_factory=dict)

    @property
    def mean(self) -> list[float]:
        """Mean top-1 per k, in ``ks`` order."""
        return [float(np.mean(self.accuracies[k])) for k in self.ks]

    @property
    def std(self) -> list[float]:
        """Standard deviation of top-1 over seeds per k (population, ddof=0)."""
        return [float(np.std(self.accuracies[k])) for k in self.ks]


def few_shot_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    ks: Sequence[int] = FEW_SHOT_KS,
    seeds: Sequence[int] = (0, 1, 2),
    c: float | None = None,
    val_x: ArrayLike | None = None,
    val_y: ArrayLike | None = None,
    coarse_grid: Sequence[float] = COARSE_GRID,
    refine_rounds: int = 1,
    max_iter: int = 1000,
    standardize: bool = True,
) -> FewShotResult:
    """k-shot probes for each k in ``ks`` and seed: test top-1 accuracies.

    Either a fixed ``c`` (scikit-learn's C) or a validation split (``val_x``, ``val_y``) to
    sweep it on for each k and seed (see the module docstring); the sweep defaults to one
    refinement round (instead of :func:`linear_probe`'s three) as it runs len(ks) x len(seeds)
    times.
    """
    if c is None and (val_x is None or val_y is None):
        raise ValueError("few_shot_probe needs a fixed C or a validation split to sweep C on")
    xtr, ytr = _array(train_x), _array(train_y, np.int64)
    accs: dict[int, list[float]] = {}
    chosen: dict[int, list[float]] = {}
    for k in ks:
        accs[k], chosen[k] = [], []
        for seed in seeds:
            idx = sample_k_shot(ytr, k, seed=seed)
            c_k = c
            if c_k is None and val_x is not None and val_y is not None:
                c_k, _ = sweep_c(
                    xtr[idx],
                    ytr[idx],
                    val_x,
                    val_y,
                    coarse_grid=coarse_grid,
                    refine_rounds=refine_rounds,
                    max_iter=max_iter,
                    standardize=standardize,
                )
            assert c_k is not None
            clf, scaler = fit_logistic(
                xtr[idx], ytr[idx], c=c_k, max_iter=max_iter, standardize=standardize
            )
            accs[k].append(probe_metrics(clf, scaler, test_x, test_y)["top1"])
            chosen[k].append(c_k)
    return FewShotResult(tuple(ks), accs, chosen)


def effective_data_efficiency(
    ks: Sequence[float], accuracies: Sequence[float], zero_shot_acc: float
) -> float:
    """Labelled examples per class at which the few-shot curve reaches zero-shot accuracy.

    ``ks`` ascending (e.g. 1, 2, 4, 8, 16), ``accuracies`` the mean few-shot accuracy at each.
    Rule:

    - the first k whose accuracy is >= ``zero_shot_acc`` is found; between it and the previous
      k the curve is interpolated linearly in log(k) and the crossing k is returned
      (e.g. 4-shot 0.50, 8-shot 0.70, zero-shot 0.60 -> sqrt(32) ~ 5.66);
    - if the smallest k already exceeds zero-shot, zero-shot is worth less than one example
      of that k: returns 0.0 (no extrapolation below the curve); exactly equal returns ks[0];
    - if no k reaches zero-shot, returns ``math.inf`` (the curve would need extrapolation).
    """
    if len(ks) != len(accuracies) or not ks:
        raise ValueError("ks and accuracies must be non-empty and of equal length")
    if any(b <= a for a, b in itertools.pairwise(ks)) or ks[0] <= 0:
        raise ValueError(f"ks must be positive and strictly increasing, got {list(ks)}")
    if accuracies[0] >= zero_shot_acc:
        return float(ks[0]) if accuracies[0] == zero_shot_acc else 0.0
    for i in range(1, len(ks)):
        a0, a1 = accuracies[i - 1], accuracies[i]
        if a1 >= zero_shot_acc:
            t = (zero_shot_acc - a0) / (a1 - a0)  # a0 < zs <= a1, so a1 > a0
            return float(
                math.exp(math.log(ks[i - 1]) + t * (math.log(ks[i]) - math.log(ks[i - 1])))
            )
    return math.inf
