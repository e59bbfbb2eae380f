"""Linear probe C sweep and refit, few-shot probes, effective data efficiency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clip_core import create_model
from clip_core.probe import (
    COARSE_GRID,
    effective_data_efficiency,
    extract_features,
    few_shot_probe,
    linear_probe,
    sample_k_shot,
    stratified_split,
    sweep_c,
)

MAX_ITER = 100
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def blobs(n: int, *, seed: int, classes: int = 5, dim: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes with a non-trivial feature scale."""
    rng = np.random.default_rng(1234)
    centres = rng.normal(size=(classes, dim)) * 1.2
    scale = rng.uniform(0.5, 4.0, size=dim)
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, size=n)
    x = (centres[y] + r.normal(size=(n, dim))) * scale
    return x, y


@pytest.mark.parametrize("standardize", [False, True])
def test_linear_probe_matches_sklearn_refit(standardize: bool) -> None:
    xtr, ytr = blobs(150, seed=0)
    xva, yva = blobs(60, seed=1)
    xte, yte = blobs(200, seed=2)
    res = linear_probe(
        xtr, ytr, xte, yte, val_x=xva, val_y=yva, max_iter=MAX_ITER, standardize=standardize
    )
    assert res.C in res.sweep
    assert res.sweep[res.C] == max(res.sweep.values())
    assert all(1e-6 <= c <= 1e6 for c in res.sweep)
    assert set(COARSE_GRID) <= set(res.sweep) and len(res.sweep) > len(COARSE_GRID)
    # chance is 0.2; a tuned probe on these blobs is far above it
    assert res.metrics["top1"] > 0.5
    clf = LogisticRegression(C=res.C, max_iter=MAX_ITER)
    model = make_pipeline(StandardScaler(), clf) if standardize else clf
    model.fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    pred = model.predict(xte)
    assert res.metrics["top1"] == pytest.approx(float((pred == yte).mean()), abs=1e-6)
    bal = balanced_accuracy_score(yte, pred)
    assert res.metrics["mean_per_class_recall"] == pytest.approx(bal, abs=1e-6)
    assert "top5" in res.metrics


def test_sweep_values_are_validation_accuracies() -> None:
    xtr, ytr = blobs(100, seed=3)
    xva, yva = blobs(50, seed=4)
    best, sweep = sweep_c(xtr, ytr, xva, yva, refine_rounds=1, standardize=False, max_iter=100)
    for c in (1e-6, 1.0, best):
        direct = LogisticRegression(C=c, max_iter=100).fit(xtr, ytr).score(xva, yva)
        assert sweep[c] == pytest.approx(direct, abs=1e-6)
    # tiny C (everything regularised away) cannot beat the best
    assert sweep[1e-6] <= sweep[best]


def test_internal_validation_split_and_binary() -> None:
    x, y = blobs(120, seed=5, classes=2)
    xte, yte = blobs(80, seed=6, classes=2)
    res = linear_probe(x, y, xte, yte, refine_rounds=1, max_iter=MAX_ITER)
    assert set(res.metrics) == {"top1", "mean_per_class_recall"}
    assert res.metrics["top1"] > 0.6
    tr, va = stratified_split(y, fraction=0.25, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert set(y[va]) == set(y)
    with pytest.raises(ValueError, match="both"):
        linear_probe(x, y, xte, yte, val_x=x)


def test_few_shot_probe() -> None:
    xtr, ytr = blobs(200, seed=7)
    xva, yva = blobs(50, seed=8)
    xte, yte = blobs(100, seed=9)
    idx = sample_k_shot(ytr, 2, seed=0)
    assert np.bincount(ytr[idx]).tolist() == [2] * 5
    assert not np.array_equal(idx, sample_k_shot(ytr, 2, seed=1))
    res = few_shot_probe(xtr, ytr, xte, yte, ks=(1, 4, 16), seeds=(0, 1), c=1.0, max_iter=100)
    assert res.ks == (1, 4, 16) and all(len(res.accuracies[k]) == 2 for k in res.ks)
    assert res.mean[0] == pytest.approx(np.mean(res.accuracies[1]))
    assert res.std[2] == pytest.approx(np.std(res.accuracies[16]))
    assert res.mean[2] > res.mean[0]
    swept = few_shot_probe(
        xtr, ytr, xte, yte, ks=(2,), seeds=(0,), val_x=xva, val_y=yva, max_iter=100
    )
    assert swept.C[2][0] > 0
    with pytest.raises(ValueError, match="fixed C"):
        few_shot_probe(xtr, ytr, xte, yte)


def test_effective_data_efficiency() -> None:
    ks = [1, 2, 4, 8, 16]
    accs = [0.3, 0.4, 0.5, 0.7, 0.8]
    assert effective_data_efficiency(ks, accs, 0.6) == pytest.approx(math.sqrt(32))
    assert effective_data_efficiency(ks, accs, 0.5) == pytest.approx(4.0)
    assert effective_data_efficiency(ks, accs, 0.35) == pytest.approx(math.sqrt(2))
    assert effective_data_efficiency(ks, accs, 0.2) == 0.0
    assert effective_data_efficiency(ks, accs, 0.3) == 1.0
    assert effective_data_efficiency(ks, accs, 0.9) == math.inf
    # non-monotone curve: the first crossing counts
    assert effective_data_efficiency(ks, [0.3, 0.6, 0.4, 0.7, 0.8], 0.45) == pytest.approx(
        2 ** (0.5)
    )
    with pytest.raises(ValueError):
        effective_data_efficiency([2, 1], [0.1, 0.2], 0.5)


def test_extract_features_before_and_after_projection() -> None:
    torch.manual_seed(0)
    model = create_model("tiny-vit").eval()
    images = torch.randn(5, 3, model.image_size, model.image_size)  # [N, 3, R, R]
    seen: list[int] = []
    feats = extract_features(model, images.split(2), on_batch=seen.append)
    assert seen == [2, 2, 1]
    with torch.no_grad():
        torch.testing.assert_close(feats, model.image_features(images), atol=1e-5, rtol=1e-4)
        proj = extract_features(model, images.split(2), projected=True)
        torch.testing.assert_close(proj, model.encode_image(images), atol=1e-5, rtol=1e-4)
    assert feats.shape == (5, model.config.vision.width)
    assert proj.shape == (5, model.config.embed_dim)
