"""Image-text retrieval recall@k with several captions per image.

Pure functions: embeddings in, metrics out. Captions are flattened into one list; caption j
belongs to image ``text_to_image[j]``. Embeddings are L2-normalised here (a no-op when they
already are), similarities are cosine.

- image -> text: a query image counts as a hit at k if ANY of its captions is among the k
  texts most similar to it.
- text -> image: each caption has exactly one positive image; a hit if it is in the top k.

Ranks are computed without sorting: the rank of a positive is the number of candidates that
score strictly higher than it (for image -> text, than the best-scoring positive), and a hit
at k is rank < k. Ties therefore count in the query's favour; with continuous embeddings they
do not occur. Similarities are computed ``chunk_size`` queries at a time, so memory is
O(chunk_size x candidates) rather than O(images x texts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Per-image caption lists -> (flat captions, text_to_image [T] image index per caption)."""
    texts: list[str] = []
    owners: list[int] = []
    for i, caps in enumerate(captions):
        if not caps:
            raise ValueError(f"image {i} has no captions")
        texts.extend(caps)
        owners.extend([i] * len(caps))
    return texts, torch.tensor(owners, dtype=torch.long)


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"expected [I, D] and [T, D] embeddings, got {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(
            f"text_to_image must have one entry per caption ({text_emb.shape[0]}), "
            f"got shape {tuple(text_to_image.shape)}"
        )
    n_images = image_emb.shape[0]
    if len(text_to_image) and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image has indices outside [0, {n_images})")
    if torch.bincount(text_to_image, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption")


def image_to_text_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per image, the 0-based rank of its best-ranked caption among all texts: [I]."""
    images = F.normalize(image_emb.float(), dim=-1)  # [I, D]
    texts = F.normalize(text_emb.float(), dim=-1).to(images.device)  # [T, D]
    owners = text_to_image.to(images.device)  # [T]
    ranks = []
    for start in range(0, images.shape[0], chunk_size):
        sims = images[start : start + chunk_size] @ texts.T  # [c, T]
        ids = torch.arange(start, start + sims.shape[0], device=images.device)  # [c]
        positive = owners[None, :] == ids[:, None]  # [c, T]
        best = sims.masked_fill(~positive, float("-inf")).amax(dim=1)  # [c]
        ranks.append((sims > best[:, None]).sum(dim=1))  # [c]
    return torch.cat(ranks).cpu()  # [I]


def text_to_image_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per caption, the 0-based rank of its image among all images: [T]."""
    images = F.normalize(image_emb.float(), dim=-1)  # [I, D]
    texts = F.normalize(text_emb.float(), dim=-1).to(images.device)  # [T, D]
    owners = text_to_image.to(images.device)  # [T]
    ranks = []
    for start in range(0, texts.shape[0], chunk_size):
        sims = texts[start : start + chunk_size] @ images.T  # [c, I]
        own = owners[start : start + sims.shape[0]]  # [c]
        pos = sims.gather(1, own[:, None])  # [c, 1]
        ranks.append((sims > pos).sum(dim=1))  # [c]
    return torch.cat(ranks).cpu()  # [T]


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways: keys ``image_to_text_R@k`` and ``text_to_image_R@k``.

    image_emb [I, D], text_emb [T, D], text_to_image [T] (index of each caption's image;
    every image needs at least one caption).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check(image_emb, text_emb, text_to_image)
    i2t = image_to_text_ranks(image_emb, text_emb, text_to_image, chunk_size=chunk_size)
    t2i = text_to_image_ranks(image_emb, text_emb, text_to_image, chunk_size=chunk_size)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t < k).float().mean().item()
    for k in ks:
        out[f"text_to_image_R@{k}"] = (t2i < k).float().mean().item()
    return out


def recall_chance(candidates: int, relevant: int, k: int) -> float:
    """Recall@k of a random ranking: P(at least one of ``relevant`` items among the first
    ``k`` of ``candidates``) = 1 - C(candidates - relevant, k) / C(candidates, k)."""
    if candidates < 1 or not 0 < relevant <= candidates or k < 1:
        raise ValueError(
            f"need 0 < relevant <= candidates and k >= 1, got {relevant}, {candidates}, {k}"
        )
    miss = 1.0
    for j in range(min(k, candidates - relevant + 1)):
        miss *= (candidates - relevant - j) / (candidates - j)
    return 1.0 - miss
