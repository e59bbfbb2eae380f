"""CLIP image preprocessing: safe decoding, resize/crop transforms and normalisation.

Everything here is built on PIL, numpy and torch only (no torchvision). Decoding lives in
:mod:`clip_core.images` (no torch) and is re-exported here. The evaluation
pipeline reproduces OpenAI CLIP's preprocessing exactly (``Resize(R, BICUBIC)`` of the shorter
side, ``CenterCrop(R)``, RGB conversion, ``ToTensor``, ``Normalize``) and the training pipeline
implements the paper's only augmentation, a random square crop.

Typical use::

    image = decode_image(raw_bytes)               # RGB PIL image, bomb-checked
    pixels = eval_transform(224)(image)           # float32 [3, 224, 224]
    batch = collate_images([pixels, ...])         # float32 [B, 3, 224, 224]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from clip_core.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    check_nonempty,
    decode_image,
    to_rgb,
    verify_image,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "EvalTransform",
    "ImageDecodeError",
    "ImageTooLargeError",
    "TrainTransform",
    "collate_images",
    "decode_image",
    "eval_transform",
    "normalize_pixels",
    "to_normalized_tensor",
    "to_uint8_tensor",
    "train_transform",
    "verify_image",
]

#: Per-channel RGB mean used by OpenAI CLIP (on pixel values scaled to [0, 1]).
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
#: Per-channel RGB standard deviation used by OpenAI CLIP (on pixel values scaled to [0, 1]).
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = Image.Resampling.BICUBIC


# --------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------


def _check_resolution(resolution: int) -> int:
    """Return ``resolution`` if it is a positive ``int``, else raise ``ValueError``."""
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ValueError(f"resolution must be an int, got {type(resolution).__name__}")
    if resolution <= 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")
    return resolution


def _check_mean_std(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Validate per-channel normalisation statistics and return them as float 3-tuples."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"mean and std must each have 3 values (one per RGB channel), "
            f"got len(mean)={len(mean)}, len(std)={len(std)}"
        )
    m = tuple(float(v) for v in mean)
    s = tuple(float(v) for v in std)
    if not all(math.isfinite(v) for v in m):
        raise ValueError(f"mean values must be finite, got {m}")
    if not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"std values must be finite and > 0, got {s}")
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def _check_scale(scale: Sequence[float]) -> tuple[float, float]:
    """Validate a ``(lo, hi)`` crop-scale range with ``0 < lo <= hi <= 1``."""
    if len(scale) != 2:
        raise ValueError(f"scale must be a (lo, hi) pair, got {tuple(scale)!r}")
    lo, hi = float(scale[0]), float(scale[1])
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got ({lo}, {hi})")
    return lo, hi


# --------------------------------------------------------------------------------------------
# Tensor conversion
# --------------------------------------------------------------------------------------------


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a contiguous uint8 tensor ``[3, H, W]`` (RGB pixels, unscaled).

    Non-RGB images are converted first (transparency composited onto white). This is what the
    training pipeline ships (4x fewer bytes than float32); :func:`normalize_pixels` finishes
    the job on the training device.
    """
    if image.mode != "RGB":
        image = to_rgb(image)
    arr = np.asarray(image, dtype=np.uint8)  # [H, W, 3], read-only view of Pillow's buffer
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # [3, H, W], contiguous copy


def normalize_pixels(
    pixels: torch.Tensor,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> torch.Tensor:
    """uint8 RGB pixels ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std``, same device.

    The same arithmetic as :func:`to_normalized_tensor`, so a batch normalised here equals the
    stack of per-image normalised tensors exactly. Raises ``TypeError`` for a non-uint8 input.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels expects uint8 pixels, got {pixels.dtype}")
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"expected pixels [..., 3, H, W], got shape {tuple(pixels.shape)}")
    m, s = _check_mean_std(mean, std)
    out = pixels.to(torch.float32).div_(255.0)  # [..., 3, H, W] in [0, 1]
    mean_t = torch.tensor(m, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(s, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return out.sub_(mean_t).div_(std_t)  # [..., 3, H, W]


def to_normalized_tensor(
    image: Image.Image,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> torch.Tensor:
    """Convert a PIL image to a normalised float32 tensor of shape ``[3, H, W]``.

    Non-RGB images are converted first (transparency composited onto white). Pixel values are
    scaled to ``[0, 1]`` and then normalised per channel as ``(x - mean) / std``, like
    torchvision's ``ToTensor()`` followed by ``Normalize(mean, std)``.
    """
    return normalize_pixels(to_uint8_tensor(image), mean, std)  # [3, H, W]


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic-resize so the shorter side equals ``size``, like torchvision ``Resize(int)``."""
    width, height = check_nonempty(image)
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), _BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size x size`` square using torchvision's ``center_crop`` rounding.

    The image must be at least ``size`` pixels on both sides.
    """
    width, height = image.size
    # torchvision: int(round(x)); Python's round() already returns an int (half-to-even).
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic CLIP evaluation preprocessing (identical to OpenAI CLIP's ``preprocess``).

    Bicubic-resizes the shorter side to ``resolution``, centre-crops ``resolution x resolution``,
    converts to RGB and normalises. Calling it returns a float32 tensor ``[3, R, R]``.
    """

    resolution: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        """Validate the fields and normalise ``mean``/``std`` to float tuples."""
        _check_resolution(self.resolution)
        m, s = _check_mean_std(self.mean, self.std)
        object.__setattr__(self, "mean", m)
        object.__setattr__(self, "std", s)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Transform one PIL image into a normalised float32 tensor ``[3, R, R]``."""
        rgb = image if image.mode == "RGB" else to_rgb(image)
        resized = _resize_shorter_side(rgb, self.resolution)  # shorter side == R
        cropped = _center_crop(resized, self.resolution)  # R x R
        return to_normalized_tensor(cropped, self.mean, self.std)  # [3, R, R]


@dataclass(frozen=True)
class TrainTransform:
    """CLIP training preprocessing: a random square crop, resized to ``resolution``.

    This is the only augmentation used in the CLIP paper. For an image of size ``w x h`` the
    crop side is ``s = round(u * min(w, h))`` (at least 1) with ``u ~ Uniform(scale[0],
    scale[1])``; its top-left corner is uniform over all positions keeping the square inside
    the image. The square is bicubic-resized to ``R x R``, converted to RGB and normalised.
    Randomness comes from the ``generator`` passed to :meth:`__call__` (or torch's global RNG),
    so results are reproducible under a seed.
    """

    resolution: int
    scale: tuple[float, float] = (0.9, 1.0)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        """Validate the fields and normalise ``scale``/``mean``/``std`` to float tuples."""
        _check_resolution(self.resolution)
        object.__setattr__(self, "scale", _check_scale(self.scale))
        m, s = _check_mean_std(self.mean, self.std)
        object.__setattr__(self, "mean", m)
        object.__setattr__(self, "std", s)

    def sample_crop(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int]:
        """Draw a crop for a ``width x height`` image; returns ``(left, top, side)``.

        The square ``[left, left + side) x [top, top + side)`` always lies inside the image.
        Consumes exactly three draws from ``generator`` (or torch's global RNG).
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero area: {width}x{height}")
        device = generator.device if generator is not None else torch.device("cpu")
        lo, hi = self.scale
        u = lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64, device=device)
        short = min(width, height)
        side = min(max(round(float(u) * short), 1), short)
        # randint's upper bound is exclusive, so positions span 0 .. (extent - side) inclusive.
        top = int(torch.randint(0, height - side + 1, (), generator=generator, device=device))
        left = int(torch.randint(0, width - side + 1, (), generator=generator, device=device))
        return left, top, side

    def crop(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """The random square crop of one PIL image, bicubic-resized to ``R x R``, in RGB."""
        rgb = image if image.mode == "RGB" else to_rgb(image)
        width, height = check_nonempty(rgb)
        left, top, side = self.sample_crop(width, height, generator)
        square = rgb.crop((left, top, left + side, top + side))  # side x side
        res = self.resolution
        if side != res:
            square = square.resize((res, res), _BICUBIC)  # R x R
        return square

    def pixels(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`crop` as uint8 pixels ``[3, R, R]``; :func:`normalize_pixels` finishes them."""
        return to_uint8_tensor(self.crop(image, generator))  # [3, R, R] uint8

    def __call__(
        self, image: Image.Image, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Randomly crop and resize one PIL image into a normalised float32 ``[3, R, R]``."""
        return normalize_pixels(self.pixels(image, generator), self.mean, self.std)  # [3, R, R]


def eval_transform(resolution: int) -> EvalTransform:
    """Build the OpenAI-CLIP evaluation transform for ``resolution x resolution`` inputs."""
    return EvalTransform(resolution=resolution)


def train_transform(resolution: int, scale: tuple[float, float] = (0.9, 1.0)) -> TrainTransform:
    """Build the random-square-crop training transform for ``resolution x resolution`` inputs."""
    return TrainTransform(resolution=resolution, scale=scale)


def collate_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image tensors ``[3, R, R]`` into a batch ``[B, 3, R, R]``.

    Raises ``ValueError`` (naming the offending index and shapes) if the sequence is empty,
    an element is not a ``[C, H, W]`` tensor, or shapes / dtypes differ.
    """
    if len(images) == 0:
        raise ValueError("collate_images needs at least one image tensor, got an empty sequence")
    first = images[0]
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor):
            raise ValueError(f"images[{i}] is a {type(img).__name__}, expected a torch.Tensor")
        if img.dim() != 3:
            raise ValueError(f"images[{i}] has shape {tuple(img.shape)}, expected [C, H, W]")
        if img.shape != first.shape:
            raise ValueError(
                f"all images must have the same shape to be batched: images[0] has shape "
                f"{tuple(first.shape)} but images[{i}] has shape {tuple(img.shape)}"
            )
        if img.dtype != first.dtype:
            raise ValueError(
                f"all images must have the same dtype: images[0] is {first.dtype} "
                f"but images[{i}] is {img.dtype}"
            )
    return torch.stack(list(images), dim=0)  # [B, C, H, W]
