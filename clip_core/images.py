"""Safe image decoding: bytes in, an RGB PIL image (or a verdict) out, bombs refused.

Pillow and numpy only (no torch), so the ingest checks and their worker processes start
without importing torch. :mod:`clip_core.transforms` re-exports everything public here.

Typical use::

    image = decode_image(raw_bytes)               # RGB PIL image, bomb-checked
    width, height = verify_image(raw_bytes)       # the same verdict, cheaper for JPEGs
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from PIL import Image

_T = TypeVar("_T")

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "check_nonempty",
    "decode_image",
    "to_rgb",
    "verify_image",
]

#: Default upper bound on ``width * height`` accepted by :func:`decode_image`.
#:
#: This is the same number as PIL's own default ``PIL.Image.MAX_IMAGE_PIXELS``
#: (``int(1024 * 1024 * 1024 // 4 // 3)`` = 89,478,485, i.e. roughly a 1 GiB RGB buffer with
#: 4 bytes per pixel / 3). It is copied here rather than read from PIL so the limit does not
#: change when some other code mutates PIL's process-global setting (a common
#: ``MAX_IMAGE_PIXELS = None`` "fix" disables PIL's protection entirely).
DEFAULT_MAX_PIXELS: int = 89_478_485

_WHITE_RGBA = (255, 255, 255, 255)
# Modes whose pixels carry an alpha channel (premultiplied or not).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# 16-bit integer greyscale modes; PIL's own convert("RGB") clips these at 255 instead of scaling.
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(ValueError):
    """The bytes could not be decoded as an image (empty, corrupt, truncated, unknown format)."""


class ImageTooLargeError(ImageDecodeError):
    """The image header declares more pixels than allowed (a likely decompression bomb)."""


def check_nonempty(image: Image.Image) -> tuple[int, int]:
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


def to_rgb(image: Image.Image) -> Image.Image:
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
    return _decode(data, max_pixels, to_rgb)


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
