"""CLIP image preprocessing: safe decoding, resize/crop transforms and normalisation.

Everything here is built on PIL, numpy and torch only (no torchvision). The evaluation
pipeline reproduces OpenAI CLIP's preprocessing exactly (``Resize(R, BICUBIC)`` of the shorter
side, ``CenterCrop(R)``, RGB conversion, ``ToTensor``, ``Normalize``) and the training pipeline
implements the paper's only augmentation, a random square crop.

Typical use::

    image = decode_image(raw_bytes)               # RGB PIL image, bomb-checked
    pixels = eval_transform(224)(image)           # float32 [3, 224, 224]
    batch = collate_images([pixels, ...])         # float32 [B, 3, 224, 224]
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

_T = TypeVar("_T")

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

#: Default upper bound on ``width * height`` accepted by :func:`decode_image`.
#:
#: This is the same number as PIL's own default ``PIL.Image.MAX_IMAGE_PIXELS``
#: (``int(1024 * 1024 * 1024 // 4 // 3)`` = 89,478,485, i.e. roughly a 1 GiB RGB buffer with
#: 4 bytes per pixel / 3). It is copied here rather than read from PIL so the limit does not
#: change when some other code mutates PIL's process-global setting (a common
#: ``MAX_IMAGE_PIXELS = None`` "fix" disables PIL's protection entirely).
DEFAULT_MAX_PIXELS: int = 89_478_485

_BICUBIC = Image.Resampling.BICUBIC
_WHITE_RGBA = (255, 255, 255, 255)
# Modes whose pixels carry an alpha channel (premultiplied or not).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# 16-bit integer greyscale modes; PIL's own convert("RGB") clips these at 255 instead of scaling.
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(ValueError):
    """The bytes could not be decoded as an image (empty, corrupt, truncated, unknown format)."""


class ImageTooLargeError(ImageDecodeError):
    """The image header declares more pixels than allowed (a likely decompression bomb)."""


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


def _check_nonempty(image: Image.Image) -> tuple[int, int]:
    """Return ``(width, height)``, raising ``ValueError`` for zero-area images."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValueError(f"image has zero area: {width}x{height}")
    return width, height


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _uint16_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer) greyscale image to 8-bit RGB by value, not by clipping."""
    arr = np.asarray(image).astype(np.float64)  # [H, W]
    if image.mode in _UINT16_MODES or (arr.size and arr.max() > 255):
        arr = arr / 257.0  # 65535 -> 255
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)  # [H, W]
    return Image.fromarray(grey).convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    """Whether ``image`` has an alpha channel or a transparent colour key / palette entry."""
    if image.mode in _ALPHA_MODES:
        return True
    return image.info.get("transparency") is not None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to RGB, compositing transparent content onto a white background.

    Always returns a new image object (never ``image`` itself).
    """
    if image.mode in _UINT16_MODES or image.mode == "I":
        return _uint16_to_rgb(image)  # (colour-key transparency of 16-bit images is ignored)
    if _has_transparency(image):
        rgba = image.convert("RGBA")  # applies alpha / tRNS / palette transparency
        background = Image.new("RGBA", rgba.size, _WHITE_RGBA)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, WebP, GIF, ...) into a fully loaded RGB image.

    The declared ``width * height`` is read from the file header and compared with
    ``max_pixels`` *before* any pixel data is decoded, so a decompression bomb (a tiny file
    declaring an enormous canvas) is rejected without allocating the canvas. This check does
    not depend on PIL's process-global ``PIL.Image.MAX_IMAGE_PIXELS`` (it holds even if that is
    set to ``None``). PIL's own global check still runs inside ``Image.open`` (it cannot be
    turned off per call without mutating process state); if it fires first, its
    ``DecompressionBombError`` (over ``2 * MAX_IMAGE_PIXELS``), or its
    ``DecompressionBombWarning`` when warnings are configured as errors, is converted to
    :class:`ImageTooLargeError` too. PIL's global can therefore only tighten the limit, never
    loosen it; between ``MAX_IMAGE_PIXELS`` and twice that PIL merely emits its warning and
    ``max_pixels`` decides.

    The image is then fully loaded, so truncated or corrupt pixel data fails here rather than
    later in a transform (unless some code has set PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES = True``). Images with transparency (alpha modes such as
    RGBA/LA, palette or colour-key transparency) are alpha-composited onto white; 16-bit
    greyscale is scaled down to 8 bits. Multi-frame files yield their first frame. EXIF
    orientation is not applied (matching OpenAI CLIP preprocessing).

    Args:
        data: The encoded file contents (``bytes``, ``bytearray`` or ``memoryview``).
        max_pixels: Largest accepted ``width * height``; defaults to :data:`DEFAULT_MAX_PIXELS`.

    Returns:
        A loaded PIL image in mode ``"RGB"``, independent of ``data``.

    Raises:
        ImageTooLargeError: The header declares more than ``max_pixels`` pixels.
        ImageDecodeError: ``data`` is empty, not a recognised image, corrupt or truncated.
        ValueError: ``max_pixels`` is not a positive int.
        TypeError: ``data`` is not bytes-like.
    """
    return _decode(data, max_pixels, _to_rgb)


def verify_image(
    data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """``(width, height)`` after the same checks as :func:`decode_image`, and the same verdict.

    For validation without the pixels: it raises exactly what :func:`decode_image` raises for
    the same bytes, and returns the size the header declares.

    A colour or grey JPEG is decoded once, with libjpeg's DCT scaling: every marker, every
    scan and every entropy-coded coefficient of every block is decoded (which is where
    corruption and truncation show), but the pixels are reconstructed at 1/8 scale, to YCbCr
    (grey stays grey). Only the inverse DCT, chroma upsampling and colour transform are thus
    cut short, and they are arithmetic that cannot fail. About 1.7x faster than the ordinary
    decode of a baseline JPEG (BENCHMARKS.md). Should that decode fail for any reason (a
    corrupt or truncated file, or a JPEG stored as RGB, which libjpeg cannot output as YCbCr),
    the bytes are decoded again exactly as :func:`decode_image` does, so the result or error
    is always that of the ordinary decode. ``tests/test_checks.py`` compares the two verdicts
    on thousands of corrupted JPEGs.
    """
    size: list[tuple[int, int]] = []
    try:
        _decode(data, max_pixels, _size, lambda image: _reduce_reconstruction(image, size))
        return size[0]
    except ImageTooLargeError:
        raise  # decided from the header, before any pixel was decoded
    except ImageDecodeError:
        return _decode(data, max_pixels, _size)


def _size(image: Image.Image) -> tuple[int, int]:
    """``image.size``."""
    return image.size


#: libjpeg's smallest DCT scale: 1/8 (each 8x8 block reconstructed from its DC coefficient).
_JPEG_SCALE = 8
#: JPEG modes decoded at reduced scale, and the output mode they decode to.
_REDUCED_JPEG_MODES = {"RGB": "YCbCr", "L": "L"}


def _reduce_reconstruction(image: Image.Image, size: list[tuple[int, int]]) -> None:
    """Before ``load``: record the header's size in ``size``; a colour or grey JPEG will then
    decode every coefficient but reconstruct at 1/8 scale (a no-op for anything else)."""
    size.append(image.size)
    mode = _REDUCED_JPEG_MODES.get(image.mode) if image.format == "JPEG" else None
    if mode is not None:
        width, height = image.size
        # Pillow picks the largest scale s in (8, 4, 2, 1) with s <= size // requested.
        reduced = (max(1, width // _JPEG_SCALE), max(1, height // _JPEG_SCALE))
        image.draft(mode, reduced)


def _decode(
    data: bytes | bytearray | memoryview,
    max_pixels: int,
    finish: Callable[[Image.Image], _T],
    prepare: Callable[[Image.Image], None] | None = None,
) -> _T:
    """Open ``data``, check the declared size, ``prepare(image)``, load every pixel, then
    ``finish(image)``."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("cannot decode image: data is empty (0 bytes)")

    try:
        with Image.open(io.BytesIO(data)) as opened:
            # Only the header has been parsed at this point; no pixel buffer exists yet.
            width, height = opened.size
            pixels = width * height
            if pixels > max_pixels:
                raise ImageTooLargeError(
                    f"image declares {width}x{height} = {pixels} pixels, over the limit of "
                    f"{max_pixels} pixels (possible decompression bomb)"
                )
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"image declares an empty size {width}x{height}")
            if prepare is not None:
                prepare(opened)
            opened.load()  # decode all pixel data now: truncation / corruption surfaces here
            return finish(opened)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            f"image rejected by PIL's decompression-bomb check ({exc}); "
            f"limit passed to decode_image: max_pixels={max_pixels}"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"cannot decode image: unknown format or unreadable header ({len(data)} bytes)"
        ) from exc
    except (OSError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError) as exc:
        # PIL signals corrupt / truncated data with a variety of exception types.
        raise ImageDecodeError(
            f"cannot decode image: corrupt or truncated data ({type(exc).__name__}: {exc})"
        ) from exc
    except ValueError as exc:
        raise ImageDecodeError(
            f"cannot decode image: invalid image data ({type(exc).__name__}: {exc})"
        ) from exc


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
        image = _to_rgb(image)
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
    width, height = _check_nonempty(image)
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
        rgb = image if image.mode == "RGB" else _to_rgb(image)
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
        rgb = image if image.mode == "RGB" else _to_rgb(image)
        width, height = _check_nonempty(rgb)
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
