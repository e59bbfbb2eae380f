"""Verification of candidate duplicate pairs: affine alignment, then the worst local mismatch.

Production near-duplicate systems retrieve candidates with an embedding and then verify each
candidate pair with a finer, alignment-aware comparison. This module is that second stage,
pure tensors in, scores out (the pipeline fetches the images):

1. Both images are resized to ``size`` x ``size`` (the whole image squashed to a square, as
   the detector sees it; 32 px by default: a common band both the original and a down/up-
   scaled copy still hold).
2. An affine warp of the query onto the candidate is found by projected gradient ascent
   (Adam on the 6 affine parameters, all pairs of a batch at once) on their normalised
   cross-correlation (NCC), from a few starting zooms, coarse to fine (the first half of
   the steps at ``coarse`` px: a wider basin, a quarter of the cost), and kept inside a
   small-alignment box (zoom, shear/rotation and shift bounds: a copy is a crop of the
   original, not another scene).
3. The score is not the NCC (dominated by the large background/object layout, which
   unrelated images of the same colours and positions share) but the *worst local
   mismatch*: both images are standardised (zero mean, unit variance: brightness and
   contrast jitter drop out), their difference is averaged over ``pool`` x ``pool``
   windows, and the ``quantile`` (0.99) of its absolute value over the image is the
   mismatch ``m``. A copy differs from its source by small, spread-out changes (blur, JPEG,
   jitter, sub-pixel misalignment) that the window average cancels; a different image
   differs somewhere by a blob of consistent sign (another shape, another texture, a
   missing object). The score is ``1 / (1 + m)``: 1 for identical images, higher = more
   similar, in (0, 1].

See docs/overlap.md ("Verification") for the measurements behind these choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_core.config import reject_unknown_keys
from clip_overlap.embed import ImageLike, to_pil

__all__ = [
    "VerifyConfig",
    "align",
    "load_pixels",
    "mismatch",
    "ncc",
    "verify_pairs",
    "warp",
]


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of the verification stage (unknown keys are errors in :meth:`from_dict`).

    ``k`` candidates per query (the search's top-k, at most ``SearchConfig.k``) are verified
    at ``size`` px; ``steps`` gradient steps per starting zoom in ``starts``; the affine is
    kept within zoom [``min_zoom``, ``max_zoom``] on the diagonal, |off-diagonal| <=
    ``max_shear`` and |shift| <= ``max_shift`` (normalised coordinates, image = [-1, 1]);
    the mismatch is the ``quantile`` of the ``pool`` x ``pool``-averaged difference. The
    first half of the steps runs at ``coarse`` px (0: at ``size`` on 3x3-blurred images).
    ``batch`` pairs are aligned at once; ``queries_per_pass`` queries' candidates are fetched
    from the shards at once (bounds memory).
    """

    k: int = 5
    size: int = 32
    steps: int = 40
    starts: tuple[float, ...] = (1.0, 0.92)
    lr: float = 0.02
    min_zoom: float = 0.8
    max_zoom: float = 1.02
    max_shear: float = 0.15
    max_shift: float = 0.2
    pool: int = 5
    quantile: float = 0.99
    coarse: int = 16
    batch: int = 512
    queries_per_pass: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", tuple(float(s) for s in self.starts))
        for name in ("k", "steps", "pool", "batch", "queries_per_pass"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"verify {name} must be positive, got {getattr(self, name)}")
        if not 8 <= self.size <= 256:
            raise ValueError(f"verify size must be in [8, 256], got {self.size}")
        if self.coarse < 0 or self.coarse > self.size:
            raise ValueError(f"verify coarse must be in [0, size], got {self.coarse}")
        if self.pool > self.size:
            raise ValueError(f"verify pool {self.pool} larger than size {self.size}")
        if not self.starts or not all(self.min_zoom <= s <= self.max_zoom for s in self.starts):
            raise ValueError(f"verify starts {self.starts} must lie in [min_zoom, max_zoom]")
        if not 0 < self.min_zoom <= self.max_zoom or self.max_shear < 0 or self.max_shift < 0:
            raise ValueError("verify bounds: need 0 < min_zoom <= max_zoom, shear/shift >= 0")
        if not 0.0 < self.quantile <= 1.0 or self.lr <= 0:
            raise ValueError("verify quantile must be in (0, 1] and lr positive")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VerifyConfig:
        """Build from a dict; unknown keys are errors."""
        reject_unknown_keys(cls, raw, "verify option")
        values = dict(raw)
        if "starts" in values:
            values["starts"] = tuple(values["starts"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (starts as a list)."""
        out = dataclasses.asdict(self)
        out["starts"] = list(self.starts)
        return out


def load_pixels(images: Sequence[ImageLike], size: int) -> torch.Tensor:
    """Images (PIL or encoded bytes) -> [N, 3, size, size] in [0, 1], each squashed to a
    square: bicubic to 2 x ``size``, then an anti-aliased halving (a clean low-pass)."""
    if not images:
        return torch.zeros(0, 3, size, size)
    arrays = [
        np.asarray(to_pil(im).convert("RGB").resize((2 * size, 2 * size), Image.Resampling.BICUBIC))
        for im in images
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, 2S, 2S]
    return F.interpolate(x, size=size, mode="bilinear", antialias=True)  # [N, 3, S, S]


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation [P] of image pairs a, b [P, C, H, W] (whole image)."""
    fa, fb = a.flatten(1), b.flatten(1)  # [P, CHW]
    fa = F.normalize(fa - fa.mean(1, keepdim=True), dim=1)
    fb = F.normalize(fb - fb.mean(1, keepdim=True), dim=1)
    return (fa * fb).sum(1)  # [P]


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x [P, C, S, S] at the affine grids theta [P, 2, 3] (borders replicated)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [P, S, S, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 box blur of x [P, C, S, S], borders replicated."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _bounds(config: VerifyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise lower and upper bounds [2, 3] of the affine parameters."""
    z0, z1, s, t = config.min_zoom, config.max_zoom, config.max_shear, config.max_shift
    low = torch.tensor([[z0, -s, -t], [-s, z0, -t]])
    high = torch.tensor([[z1, s, t], [s, z1, t]])
    return low, high


@torch.enable_grad()  # the ascent needs gradients even when called under no_grad
def align(query: torch.Tensor, cand: torch.Tensor, config: VerifyConfig) -> torch.Tensor:
    """The affine theta [P, 2, 3] warping each query [P, 3, S, S] best onto its candidate
    [P, 3, S, S]: projected gradient ascent on the NCC from each starting zoom, coarse then
    fine (the fine half with a linearly decaying step size); the theta of the highest
    full-resolution NCC seen (starting points included) is returned."""
    low, high = _bounds(config)
    p = query.shape[0]
    best = torch.full((p,), -2.0)  # [P]
    best_theta = torch.zeros(p, 2, 3)

    def keep(theta: torch.Tensor, score: torch.Tensor) -> None:
        better = score > best
        best.copy_(torch.where(better, score, best))
        best_theta[better] = theta[better]

    if config.coarse:  # the first half of the steps at a lower resolution (no blur)
        coarse_q = F.interpolate(query, size=config.coarse, mode="bilinear", antialias=True)
        coarse_c = F.interpolate(cand, size=config.coarse, mode="bilinear", antialias=True)
    else:  # the first half on 3x3-blurred images
        coarse_q, coarse_c = query, _blur(cand)  # [P, 3, S, S]
    half = config.steps // 2
    for zoom in config.starts:
        start = torch.tensor([[zoom, 0.0, 0.0], [0.0, zoom, 0.0]])
        theta = start.repeat(p, 1, 1).requires_grad_(True)  # [P, 2, 3]
        opt = torch.optim.Adam([theta], lr=config.lr)
        with torch.no_grad():
            keep(theta.detach(), ncc(warp(query, theta), cand))
        for step in range(config.steps):
            if step < half:
                warped = warp(coarse_q, theta)  # [P, 3, S', S']
                score = ncc(warped if config.coarse else _blur(warped), coarse_c)  # [P]
            else:
                opt.param_groups[0]["lr"] = (
                    config.lr * (config.steps - step) / (config.steps - half)
                )
                score = ncc(warp(query, theta), cand)  # [P]
                keep(theta.detach(), score.detach())
            opt.zero_grad(set_to_none=True)
            (-score.sum()).backward()  # pairs are independent: one sum, per-pair gradients
            opt.step()
            with torch.no_grad():
                theta.copy_(torch.maximum(torch.minimum(theta, high), low))
        with torch.no_grad():
            keep(theta.detach(), ncc(warp(query, theta), cand))
    return best_theta


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Each image of x [P, C, H, W] to zero mean and unit variance (over all its values)."""
    flat = x.flatten(1)  # [P, CHW]
    mean = flat.mean(1).view(-1, 1, 1, 1)
    std = flat.std(1).view(-1, 1, 1, 1)
    return (x - mean) / (std + 1e-6)


def mismatch(warped: torch.Tensor, cand: torch.Tensor, pool: int, quantile: float) -> torch.Tensor:
    """The worst local mismatch [P] of aligned pairs [P, 3, S, S]: the ``quantile`` over
    positions of the largest (over channels) |pool x pool average| of the difference of the
    standardised images."""
    diff = _standardise(warped) - _standardise(cand)  # [P, 3, S, S]
    local = F.avg_pool2d(diff, pool, stride=1).abs().amax(1)  # [P, S', S']
    return torch.quantile(local.flatten(1), quantile, dim=1)  # [P]


def verify_pairs(query: torch.Tensor, cand: torch.Tensor, config: VerifyConfig) -> torch.Tensor:
    """Verified similarity [P] in (0, 1] of pairs of images [P, 3, S, S] in [0, 1] (from
    :func:`load_pixels` at ``config.size``): ``1 / (1 + mismatch)`` after alignment,
    ``config.batch`` pairs at a time."""
    if query.shape != cand.shape or query.ndim != 4:
        raise ValueError(f"query {tuple(query.shape)} and candidates {tuple(cand.shape)} differ")
    parts: list[torch.Tensor] = []
    for i in range(0, query.shape[0], config.batch):
        q, c = query[i : i + config.batch], cand[i : i + config.batch]  # [B, 3, S, S]
        theta = align(q, c, config)  # [B, 2, 3]
        with torch.no_grad():
            m = mismatch(warp(q, theta), c, config.pool, config.quantile)  # [B]
        parts.append(1.0 / (1.0 + m))
    return torch.cat(parts) if parts else torch.zeros(0)
