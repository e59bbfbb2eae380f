"""A dedicated near-duplicate detector and the synthetic augmentations it is trained on.

The paper found plain CLIP embeddings too semantic for duplicate detection (two different
photos of a dog are close) and trained a dedicated detector with a contrastive (InfoNCE)
loss on synthetic augmentations of the same image: crops, zooms, aspect-ratio changes,
down/up-scaling, small rotations, JPEG compression and colour jitter. This module holds

* :class:`DetectorConfig` (frozen; unknown keys are errors) and :class:`DuplicateDetector`,
  a small convolutional network that keeps a coarse spatial grid (layout matters for
  copies) and maps an image to an L2-normalised embedding;
* :func:`augment` (PIL, one image) and :func:`augment_batch` (vectorised torch, a batch of
  [0, 1] tensors; what training uses), the random copy-making transforms, over wider ranges
  than :func:`clip_core.synthetic.near_duplicate`'s planted copies;
* :func:`detector_input`, the deterministic preprocessing (the whole image squashed to a
  square, so aspect changes and crops keep all content in place).

Pure library: no files; training loops and checkpoints live in ``clip_overlap.detector``.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import nn

from clip_core.config import reject_unknown_keys
from clip_core.transforms import OPENAI_MEAN, OPENAI_STD

__all__ = [
    "DetectorConfig",
    "DuplicateDetector",
    "augment",
    "augment_batch",
    "detector_batch",
    "detector_input",
    "normalise_pixels",
]


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture of the detector: input resolution, conv widths, pooled grid, output dim."""

    image_size: int = 64
    widths: tuple[int, ...] = (32, 64, 96)
    grid: int = 4
    embed_dim: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], got {self.image_size}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive ints, got {self.widths}")
        if self.image_size >> len(self.widths) < self.grid or self.grid < 1:
            raise ValueError(
                f"grid {self.grid} must be in [1, image_size / 2**len(widths)] "
                f"= [1, {self.image_size >> len(self.widths)}]"
            )
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DetectorConfig:
        """Build from a dict; unknown keys are errors."""
        reject_unknown_keys(cls, raw, "detector config key")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (widths as a list)."""
        out = dataclasses.asdict(self)
        out["widths"] = list(self.widths)
        return out


class DuplicateDetector(nn.Module):
    """Strided conv stack -> adaptive average pool to a ``grid x grid`` map -> linear -> L2 norm."""

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        previous = 3
        for width in config.widths:
            layers += [
                nn.Conv2d(previous, width, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, width), width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(config.grid)
        self.head = nn.Linear(previous * config.grid**2, config.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, R, R] -> L2-normalised embeddings [B, D]."""
        x = self.pool(self.features(images))  # [B, C, G, G]
        return F.normalize(self.head(x.flatten(1)), dim=-1)  # [B, D]


def detector_input(image: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB image -> normalised tensor [3, R, R]: the whole image resized to a square."""
    rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, R, R]
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


def detector_batch(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """A list of RGB images -> [B, 3, R, R]."""
    return torch.stack([detector_input(im, image_size) for im in images])


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random synthetic copy of ``image``: crop/zoom, aspect change, down/up-scaling,
    rotation, colour jitter and JPEG re-encoding, each drawn from ``rng``.

    Ranges (each applied with probability 0.8, JPEG always): keep 80-100% of each side,
    aspect x0.85-1.15, scale round trip x0.4-0.9, rotation up to 8 degrees, brightness/
    contrast/saturation x0.88-1.12, JPEG quality 50-95.
    """
    img = image.convert("RGB")
    w, h = img.size
    if rng.random() < 0.8:
        keep = rng.uniform(0.8, 1.0, size=2)
        cw, ch = max(1, round(w * keep[0])), max(1, round(h * keep[1]))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((left, top, left + cw, top + ch))
    out_w, out_h = w, h
    if rng.random() < 0.8:
        out_w = max(1, round(w * float(rng.uniform(0.85, 1.15))))
    if rng.random() < 0.8:
        factor = float(rng.uniform(0.4, 0.9))
        img = img.resize((max(1, round(out_w * factor)), max(1, round(out_h * factor))))
    img = img.resize((out_w, out_h), Image.Resampling.BICUBIC)
    if rng.random() < 0.8:
        border = np.asarray(img)[[0, -1]].reshape(-1, 3).mean(axis=0)
        fill = (int(border[0]), int(border[1]), int(border[2]))
        angle = float(rng.uniform(-8, 8))
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if rng.random() < 0.8:
        jitter = rng.uniform(0.88, 1.12, size=3)
        img = ImageEnhance.Brightness(img).enhance(float(jitter[0]))
        img = ImageEnhance.Contrast(img).enhance(float(jitter[1]))
        img = ImageEnhance.Color(img).enhance(float(jitter[2]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(50, 96)))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def normalise_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, R, R] pixels in [0, 1] -> the detector's normalised input."""
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_batch(
    pixels: torch.Tensor, image_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Random synthetic copies of a batch [B, 3, H, W] in [0, 1] -> normalised [B, 3, R, R].

    Per image: a crop keeping 80-100% of each side at a random offset, an aspect change of
    x0.87-1.15, a rotation of up to 8 degrees (one affine resampling, borders replicated),
    a down/up-scaling round trip (x0.6-1.0, one factor per quarter of the batch) and
    brightness/contrast/saturation jitter of x0.88-1.12. (JPEG artefacts come from the
    caller feeding JPEG-recompressed sources, see ``clip_overlap.detector``.)
    """
    b = pixels.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    keep = uniform(0.8, 1.0, b, 2)  # [B, 2]
    keep[:, 0] *= uniform(0.87, 1.15, b)
    shift = (1 - keep).clamp(min=0) * uniform(-1.0, 1.0, b, 2)  # [B, 2]
    angle = uniform(-8.0, 8.0, b) * (torch.pi / 180)  # [B]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * keep[:, 0], -sin * keep[:, 1], shift[:, 0]], dim=1),
            torch.stack([sin * keep[:, 0], cos * keep[:, 1], shift[:, 1]], dim=1),
        ],
        dim=1,
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, [b, 3, image_size, image_size], align_corners=False)
    x = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    parts = []
    for part in x.chunk(4):  # [b/4, 3, R, R]
        small = max(4, round(image_size * float(uniform(0.6, 1.0, 1))))
        down = F.interpolate(part, size=small, mode="bilinear", antialias=True)
        parts.append(F.interpolate(down, size=image_size, mode="bilinear"))
    x = torch.cat(parts)  # [B, 3, R, R]
    jitter = uniform(0.88, 1.12, b, 3, 1, 1, 1)  # [B, 3, 1, 1, 1]
    x = x * jitter[:, 0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    x = (x - mean) * jitter[:, 1] + mean
    grey = x.mean(dim=1, keepdim=True)  # [B, 1, R, R]
    x = (x - grey) * jitter[:, 2] + grey
    return normalise_pixels(x.clamp(0.0, 1.0))
