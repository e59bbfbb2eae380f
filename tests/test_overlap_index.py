"""Streaming nearest-neighbour search (exact / IVF / HNSW), the overlap bench, augmentations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import overlap as bench_overlap
from clip_core.dedup import DetectorConfig, augment, augment_batch, detector_input
from clip_core.synthetic import generate
from clip_overlap.index import SearchConfig, search_stream


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    stored = _unit(rng.standard_normal((6000, 32)))
    queries = _unit(stored[:200] + 0.05 * rng.standard_normal((200, 32)))
    return stored, queries


def _chunks(stored: np.ndarray, size: int = 777) -> list[np.ndarray]:
    return [stored[i : i + size] for i in range(0, len(stored), size)]


def test_streamed_exact_search_equals_brute_force(vectors: tuple[np.ndarray, np.ndarray]) -> None:
    stored, queries = vectors
    result = search_stream(queries, _chunks(stored), len(stored), SearchConfig(k=5))
    assert result.kind == "exact" and result.n_stored == len(stored)
    sims = queries @ stored.T  # [Q, N]
    expected = np.argsort(-sims, axis=1)[:, :5]
    assert np.array_equal(result.ids, expected)
    assert np.allclose(result.scores, np.take_along_axis(sims, expected, axis=1), atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_copies(
    vectors: tuple[np.ndarray, np.ndarray], kind: str
) -> None:
    stored, queries = vectors
    result = search_stream(queries, _chunks(stored), len(stored), SearchConfig(kind=kind, k=1))
    assert result.kind == kind and result.n_stored == len(stored)
    assert (result.ids[:, 0] == np.arange(200)).mean() >= 0.95


def test_auto_picks_by_size_and_handles_short_streams() -> None:
    config = SearchConfig(exact_max=1000)
    assert config.resolve(1000) == "exact" and config.resolve(1001) == "ivf"
    q = _unit(np.ones((2, 4)))
    few = search_stream(q, [q[:1]], 1, SearchConfig(k=3))
    assert few.ids[:, 0].tolist() == [0, 0] and (few.ids[:, 1:] == -1).all()
    assert np.isneginf(few.scores[:, 1:]).all()
    empty = search_stream(q, [], 0, SearchConfig(kind="ivf", k=2))
    assert (empty.ids == -1).all() and empty.n_stored == 0
    with pytest.raises(ValueError, match="kind"):
        SearchConfig(kind="lsh")
    with pytest.raises(ValueError, match="unknown search option"):
        SearchConfig.from_dict({"nprob": 3})


def test_bench_runs_at_small_size(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--stored", "8000", "--queries", "300", "--dim", "32", "--clusters", "50"]
    assert bench_overlap.main([*argv, "--nprobe", "32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stored"] == 8000 and result["queries"] == 300
    assert result["recall_at_1"] >= 0.9
    assert result["exact_qps"] > 0 and result["approx_qps"] > 0


def test_augmentations_change_pixels_but_keep_the_picture() -> None:
    image = next(generate(1, "test")).image
    rng = np.random.default_rng(0)
    copy = augment(image, rng)
    size = 48
    a, b = detector_input(image, size), detector_input(copy, size)
    other = detector_input(next(generate(1, "test", start=5)).image, size)
    assert not torch.equal(a, b)
    assert (a - b).abs().mean() < (a - other).abs().mean()
    pixels = torch.from_numpy(np.asarray(image.resize((64, 64)), np.float32) / 255)
    batch = pixels.permute(2, 0, 1)[None].repeat(8, 1, 1, 1)  # [8, 3, 64, 64]
    views = augment_batch(batch, size, torch.Generator().manual_seed(0))
    assert views.shape == (8, 3, size, size)
    assert (views[0] - views[1]).abs().mean() > 0  # every view differs
    assert isinstance(copy, Image.Image) and copy.mode == "RGB"
    with pytest.raises(ValueError, match="unknown detector config"):
        DetectorConfig.from_dict({"depth": 3})
