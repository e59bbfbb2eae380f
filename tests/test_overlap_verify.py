"""The verification stage of the overlap analysis: alignment, mismatch score, row fetching."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_core.synthetic import generate, near_duplicate
from clip_data.ingest import IngestConfig, ingest
from clip_overlap.index import SearchResult
from clip_overlap.pipeline import OverlapConfig, OverlapError, verified_top1
from clip_overlap.shards import fetch_rows, iter_batches
from clip_overlap.verify import VerifyConfig, align, load_pixels, mismatch, verify_pairs, warp

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _affine(zoom_x: float, zoom_y: float, degrees: float, tx: float, ty: float) -> torch.Tensor:
    a = math.radians(degrees)
    rows = [
        [zoom_x * math.cos(a), -zoom_y * math.sin(a), tx],
        [zoom_x * math.sin(a), zoom_y * math.cos(a), ty],
    ]
    return torch.tensor(rows, dtype=torch.float32)  # [2, 3]


def test_alignment_recovers_a_known_affine_within_bounds() -> None:
    """Each synthetic image warped by a known small affine: the alignment finds it back."""
    config = VerifyConfig()
    images = load_pixels([s.image for s in generate(4, "test")], config.size)  # [4, 3, S, S]
    truth = torch.stack(
        [
            _affine(0.9, 0.94, 3.0, 0.05, -0.04),
            _affine(0.95, 0.88, -4.0, -0.08, 0.02),
            _affine(1.0, 1.0, 0.0, 0.0, 0.0),
            _affine(0.92, 0.92, 2.0, 0.1, 0.1),
        ]
    )  # [4, 2, 3]
    moved = warp(images, truth)  # [4, 3, S, S]
    found = align(images, moved, config)  # [4, 2, 3]
    assert torch.allclose(found, truth, atol=0.04), (found - truth).abs().amax(dim=(1, 2))
    low = torch.tensor([[0.8, -0.15, -0.2], [-0.15, 0.8, -0.2]])
    high = torch.tensor([[1.02, 0.15, 0.2], [0.15, 1.02, 0.2]])
    assert bool((found >= low - 1e-6).all() and (found <= high + 1e-6).all())


def test_alignment_stays_in_the_box_for_unrelated_images() -> None:
    config = VerifyConfig(steps=10)
    a = load_pixels([s.image for s in generate(6, "test")], config.size)
    b = load_pixels([s.image for s in generate(6, "train")], config.size)
    theta = align(a, b, config)
    assert float(theta[:, 0, 0].min()) >= config.min_zoom - 1e-6
    assert float(theta[:, :, 2].abs().max()) <= config.max_shift + 1e-6
    assert float(theta[:, 0, 1].abs().max()) <= config.max_shear + 1e-6


def test_copies_outscore_unrelated_images() -> None:
    """A planted-style copy (clip_core.synthetic.near_duplicate) of each image scores higher
    than the same image against any other image of the set; identical images score 1."""
    config = VerifyConfig()
    originals = [s.image for s in generate(8, "test")]
    copies = [near_duplicate(im, seed=i) for i, im in enumerate(originals)]
    q, c = load_pixels(originals, config.size), load_pixels(copies, config.size)
    own = verify_pairs(q, c, config)  # [8]
    other = verify_pairs(q, c.roll(1, dims=0), config)  # [8]: each image vs another's copy
    with torch.no_grad():  # as the pipeline calls it: the alignment still gets gradients
        same = verify_pairs(q[:2], q[:2], config)  # [2]
    assert torch.allclose(same, torch.ones(2), atol=1e-3)
    assert bool(((own > 0) & (own <= 1)).all())
    assert float(own.min()) > float(other.max()), (own, other)


def test_mismatch_sees_a_local_difference_that_ncc_hardly_sees() -> None:
    """A small blob changes the NCC a little but the worst local mismatch a lot."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.5
    y = x.clone()
    y[..., 10:14, 10:14] += 0.4  # another "shape" in one corner
    base = mismatch(x, x, 3, 0.99)
    assert float(base[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(mismatch(x, y, 3, 0.99)[0]) > 1.0


def test_verify_config_validation() -> None:
    assert VerifyConfig.from_dict({"k": 3, "starts": [1.0]}).starts == (1.0,)
    assert VerifyConfig.from_dict(VerifyConfig().to_dict()) == VerifyConfig()
    with pytest.raises(ValueError, match="unknown verify option"):
        VerifyConfig.from_dict({"kk": 1})
    with pytest.raises(ValueError, match="starts"):
        VerifyConfig(starts=(0.5,))
    with pytest.raises(ValueError, match="size"):
        VerifyConfig(size=4)
    with pytest.raises(ValueError, match="differ"):
        verify_pairs(torch.zeros(2, 3, 32, 32), torch.zeros(3, 3, 32, 32), VerifyConfig())
    with pytest.raises(OverlapError, match="verify"):
        OverlapConfig(verify="sometimes")
    parsed = OverlapConfig.from_dict({"verify": "on", "verifier": {"k": 2}})
    assert parsed.verifier.k == 2 and parsed.verify == "on"


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify") / "shards"
    ingest("synthetic", root, IngestConfig(workers=1), train=40, test=6, plant=[1, 4])
    return root


def test_fetch_rows_matches_stream_positions(small_shards: Path) -> None:
    streamed = [
        (k, im)
        for b in iter_batches(str(small_shards), split="train")
        for k, im in zip(b.keys, b.images, strict=True)
    ]
    wanted = [0, 7, len(streamed) - 1, 3, 7]
    rows = fetch_rows(str(small_shards), "train", [*wanted, -1, len(streamed) + 5])
    assert sorted(rows) == sorted(set(wanted))
    for i in wanted:
        assert rows[i] == streamed[i]
    assert fetch_rows(str(small_shards), "train", []) == {}


def test_verified_top1_picks_the_planted_copy(small_shards: Path) -> None:
    """The search's candidates in a bad order (the other copy first for the second query):
    verification picks each query's own planted copy."""
    keys = [k for b in iter_batches(str(small_shards), split="train") for k in b.keys]
    tests = [s.image for s in generate(6, "test")]
    copy_ids = [keys.index("synth-test-00000001-dup"), keys.index("synth-test-00000004-dup")]
    ids = np.array([[0, 5, copy_ids[0], 9], [copy_ids[0], 2, 3, copy_ids[1]]], dtype=np.int64)
    result = SearchResult(np.ones((2, 4), np.float32), ids, "exact", len(keys))
    config = OverlapConfig(verifier=VerifyConfig(k=4, queries_per_pass=1))
    scores, best = verified_top1(str(small_shards), [tests[1], tests[4]], result, config)
    assert best.tolist() == copy_ids
    assert bool(((scores > 0) & (scores <= 1)).all())
    short = SearchResult(np.ones((2, 4), np.float32), np.full((2, 4), -1), "exact", len(keys))
    none_scores, none_ids = verified_top1(str(small_shards), tests[:2], short, config)
    assert np.isneginf(none_scores).all() and (none_ids == -1).all()
