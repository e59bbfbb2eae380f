"""Retrieval recall@k against a brute-force loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clip_core.retrieval import flatten_captions, recall_chance, retrieval_recall


def brute_force(
    images: torch.Tensor, texts: torch.Tensor, owner: list[int], ks: tuple[int, ...]
) -> dict[str, float]:
    """Sort every query's candidates in plain Python and look for a positive in the top k."""
    images = F.normalize(images, dim=-1)
    texts = F.normalize(texts, dim=-1)
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(images)):
            scores = [float(images[i] @ texts[j]) for j in range(len(texts))]
            top = sorted(range(len(texts)), key=lambda j: -scores[j])[:k]
            hits += any(owner[j] == i for j in top)
        out[f"image_to_text_R@{k}"] = hits / len(images)
    for k in ks:
        hits = 0
        for j in range(len(texts)):
            scores = [float(texts[j] @ images[i]) for i in range(len(images))]
            top = sorted(range(len(images)), key=lambda i: -scores[i])[:k]
            hits += owner[j] in top
        out[f"text_to_image_R@{k}"] = hits / len(texts)
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_recall_matches_brute_force(seed: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_images, dim = 30, 8
    counts = torch.randint(1, 5, (n_images,), generator=gen).tolist()  # 1..4 captions each
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    images = torch.randn(n_images, dim, generator=gen) * 3  # unnormalised on purpose
    # captions noisy copies of their image: recall is neither 0 nor 1
    texts = images[owner] + 2.5 * torch.randn(len(owner), dim, generator=gen)
    perm = torch.randperm(len(owner), generator=gen)  # captions in arbitrary order
    texts, owner = texts[perm], [owner[p] for p in perm.tolist()]
    ks = (1, 5, 10)
    got = retrieval_recall(images, texts, torch.tensor(owner), ks=ks, chunk_size=chunk)
    expected = brute_force(images, texts, owner, ks)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < got["image_to_text_R@1"] < 1 and 0 < got["text_to_image_R@1"] < 1


def test_any_positive_counts() -> None:
    # image 0 has two captions: one far away, one identical; the identical one must count
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[-1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])
    r = retrieval_recall(images, texts, torch.tensor([0, 0, 1]), ks=(1,))
    assert r["image_to_text_R@1"] == 1.0
    assert r["text_to_image_R@1"] == pytest.approx(2 / 3)


def test_flatten_and_validation() -> None:
    texts, owner = flatten_captions([["a", "b"], ["c"]])
    assert texts == ["a", "b", "c"] and owner.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="no captions"):
        flatten_captions([["a"], []])
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_recall(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0]))


def test_recall_chance_is_a_random_rankings_recall() -> None:
    import math

    assert recall_chance(100, 1, 5) == pytest.approx(0.05)
    assert recall_chance(10, 10, 1) == 1.0 and recall_chance(10, 1, 20) == 1.0
    exact = 1 - math.comb(98, 5) / math.comb(100, 5)
    assert recall_chance(100, 2, 5) == pytest.approx(exact)
    gen = torch.Generator().manual_seed(0)  # and what random embeddings actually score
    hits = 0
    for _ in range(200):
        ranks = torch.randperm(40, generator=gen)[:3]  # 3 relevant of 40, top 4 taken
        hits += int((ranks < 4).any())
    assert abs(hits / 200 - recall_chance(40, 3, 4)) < 0.1
    with pytest.raises(ValueError, match="relevant"):
        recall_chance(5, 0, 1)
