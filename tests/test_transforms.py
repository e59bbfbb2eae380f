"""Tests for clip_core.transforms: decoding, eval/train transforms, normalisation, collation."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from typing import Any, Literal, NoReturn

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from clip_core.transforms import (
    DEFAULT_MAX_PIXELS,
    OPENAI_MEAN,
    OPENAI_STD,
    EvalTransform,
    ImageDecodeError,
    ImageTooLargeError,
    TrainTransform,
    collate_images,
    decode_image,
    eval_transform,
    normalize_pixels,
    to_normalized_tensor,
    to_uint8_tensor,
    train_transform,
    verify_image,
)

MEAN = torch.tensor(OPENAI_MEAN).view(3, 1, 1)  # [3, 1, 1]
STD = torch.tensor(OPENAI_STD).view(3, 1, 1)  # [3, 1, 1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """Encode ``image`` to bytes in ``fmt``."""
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _expected_norm(rgb: tuple[float, float, float]) -> torch.Tensor:
    """Normalised value of one 0..255 RGB colour, shape [3]."""
    return (torch.tensor(rgb, dtype=torch.float32) / 255.0 - MEAN.view(3)) / STD.view(3)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    """Assert equal shapes and elementwise closeness.

    (``torch.testing.assert_close`` is avoided: its first call imports torch.distributed and
    sympy, which costs several seconds.)
    """
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    worst = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert worst <= atol, f"max abs difference {worst} > {atol}"


def _unnormalize(t: torch.Tensor) -> np.ndarray:
    """Invert OpenAI normalisation of a [3, H, W] tensor back to uint8 [H, W, 3]."""
    pixels = (t * STD + MEAN) * 255.0  # [3, H, W]
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _bilevel_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A hand-written 1-bit greyscale all-black PNG declaring ``width x height``.

    ``rows`` limits how many scanlines are actually encoded in IDAT (default: all of them, a
    valid image). All-zero scanlines compress ~1000:1, so a huge canvas is a tiny file.
    """
    n_rows = height if rows is None else rows
    scanline = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = []
    block = 1000
    for start in range(0, n_rows, block):
        parts.append(comp.compress(scanline * min(block, n_rows - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb_30k() -> bytes:
    """A complete, valid 30000x30000 PNG (9e8 pixels) that is only ~100 KB on disk."""
    return _bilevel_png(30_000, 30_000)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode PNG pixel data fail the test loudly."""

    def _forbidden_load(self: Image.Image) -> NoReturn:
        raise AssertionError(f"pixel data of a {self.size} image was decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", _forbidden_load)


# --------------------------------------------------------------------------------------------
# decode_image
# --------------------------------------------------------------------------------------------


def test_error_hierarchy() -> None:
    assert issubclass(ImageDecodeError, ValueError)
    assert issubclass(ImageTooLargeError, ImageDecodeError)
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_png_round_trip_is_lossless() -> None:
    src = _noise(13, 7)
    out = decode_image(_encode(src, "PNG"))
    assert out.mode == "RGB"
    assert out.size == (13, 7)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(src))


def test_jpeg_round_trip() -> None:
    x = np.linspace(0, 255, 48)
    grad = np.stack([*np.meshgrid(x, x[::-1]), np.full((48, 48), 90.0)], axis=-1)  # [H, W, 3]
    src = Image.fromarray(grad.astype(np.uint8))
    out = decode_image(_encode(src, "JPEG", quality=95))
    assert out.mode == "RGB"
    assert out.size == (48, 48)
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(src, dtype=np.int16))
    assert diff.mean() < 3.0


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = _encode(_noise(4, 3), "PNG")
    assert decode_image(bytearray(data)).size == (4, 3)
    assert decode_image(memoryview(data)).size == (4, 3)


def test_greyscale_png_becomes_rgb() -> None:
    src = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    out = np.asarray(decode_image(_encode(src, "PNG")))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], np.asarray(src))


def test_16bit_greyscale_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 256, 32896, 65535]], dtype=np.uint16)
    out = np.asarray(decode_image(_encode(Image.fromarray(arr), "PNG")))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_rgba_transparency_is_composited_on_white() -> None:
    src = Image.new("RGBA", (3, 1))
    src.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    src.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue stays blue
    src.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    out = np.asarray(decode_image(_encode(src, "PNG")), dtype=np.int16)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])
    np.testing.assert_allclose(out[0, 2], [127, 127, 127], atol=1)


def test_la_transparency_is_composited_on_white() -> None:
    src = Image.new("LA", (2, 1))
    src.putpixel((0, 0), (0, 0))  # transparent black
    src.putpixel((1, 0), (40, 255))  # opaque dark grey
    out = np.asarray(decode_image(_encode(src, "PNG")))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [40, 40, 40])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_on_white(fmt: str) -> None:
    src = Image.new("P", (4, 2), 0)
    src.putpalette([0, 0, 0, 200, 30, 10] + [0, 0, 0] * 254)
    src.putpixel((1, 0), 1)
    src.putpixel((3, 1), 1)
    out = np.asarray(decode_image(_encode(src, fmt, transparency=0)))
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[0, 1], [200, 30, 10])
    np.testing.assert_array_equal(out[1, 3], [200, 30, 10])
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # index 0 was transparent black
    np.testing.assert_array_equal(out[1, 2], [255, 255, 255])


def test_rgb_colour_key_transparency_is_composited_on_white() -> None:
    src = Image.new("RGB", (2, 1), (10, 20, 30))
    src.putpixel((0, 0), (1, 2, 3))
    out = np.asarray(decode_image(_encode(src, "PNG", transparency=(1, 2, 3))))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])


def test_truncated_jpeg_raises() -> None:
    data = _encode(_noise(64, 64), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_truncated_png_raises() -> None:
    data = _encode(_noise(64, 64), "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_payload_raises() -> None:
    data = bytearray(_encode(_noise(32, 32), "PNG"))
    data[60:200] = b"\xff" * 140  # clobber the compressed pixel stream
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data))


def test_empty_bytes_raises() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("size", [1, 16, 4096])
def test_random_bytes_raise(size: int) -> None:
    garbage = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError):
        decode_image(garbage)


def test_png_signature_with_garbage_raises() -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)


def test_decode_rejects_non_bytes_and_bad_limit() -> None:
    data = _encode(_noise(2, 2), "PNG")
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]
    for bad in (0, -5):
        with pytest.raises(ValueError, match="max_pixels"):
            decode_image(data, max_pixels=bad)


def test_hand_written_png_is_valid() -> None:
    """Sanity check for the bomb builder: a small instance decodes to an all-black image."""
    out = decode_image(_bilevel_png(20, 9))
    assert out.size == (20, 9)
    assert not np.asarray(out).any()


def test_max_pixels_boundary_is_inclusive() -> None:
    data = _encode(_noise(10, 10), "PNG")
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=99)


def test_bomb_rejected_from_header_with_custom_limit(
    bomb_30k: bytes, no_pixel_decoding: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(bomb_30k) < 500_000  # 9e8 declared pixels in a tiny file
    # Disable PIL's global guard to prove decode_image does not rely on it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(bomb_30k, max_pixels=1_000_000)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "900000000" in message
    assert "1000000" in message
    assert "30000x30000" in message


def test_bomb_rejected_with_custom_limit_even_with_pils_guard_on(
    bomb_30k: bytes, no_pixel_decoding: None
) -> None:
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(bomb_30k, max_pixels=1_000_000)
    assert time.perf_counter() - start < 1.0
    assert "900000000" in str(info.value)
    assert "1000000" in str(info.value)


@pytest.mark.parametrize("pil_limit", [None, 89_478_485])
def test_bomb_rejected_against_default_limit(
    bomb_30k: bytes,
    no_pixel_decoding: None,
    monkeypatch: pytest.MonkeyPatch,
    pil_limit: int | None,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(bomb_30k)
    assert time.perf_counter() - start < 1.0
    assert "900000000" in str(info.value)
    assert str(DEFAULT_MAX_PIXELS) in str(info.value)


@pytest.mark.parametrize("warning_action", ["ignore", "error"])
def test_bomb_just_over_default_limit(
    no_pixel_decoding: None,
    warning_action: Literal["ignore", "error"],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1e8 pixels: over the default but inside PIL's hard-error band (only a PIL warning)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS)
    data = _bilevel_png(10_000, 10_000, rows=8)  # header is all that matters
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action, Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="100000000"):
            decode_image(data)


def test_own_limit_is_independent_of_pils_warning_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 144 px is over PIL's global warning threshold (100) but under its hard limit (200):
    # PIL only warns, and decode_image's own (looser) max_pixels decides.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _encode(_noise(12, 12), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert decode_image(data, max_pixels=1_000).size == (12, 12)


def test_stricter_pil_global_hard_limit_is_reported_as_too_large(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PIL raises DecompressionBombError inside Image.open before decode_image can look at the
    # header; that must surface as ImageTooLargeError, not as a raw PIL exception.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    data = _encode(_noise(12, 12), "PNG")
    with pytest.raises(ImageTooLargeError, match="144"):
        decode_image(data, max_pixels=1_000)


# --------------------------------------------------------------------------------------------
# to_normalized_tensor
# --------------------------------------------------------------------------------------------


def test_to_normalized_tensor_layout_and_values() -> None:
    image = Image.new("RGB", (5, 3), (0, 0, 0))
    image.putpixel((4, 0), (255, 0, 0))
    t = to_normalized_tensor(image)
    assert t.shape == (3, 3, 5)
    assert t.dtype == torch.float32
    _assert_close(t[:, 0, 4], _expected_norm((255, 0, 0)))
    _assert_close(t[:, 2, 0], _expected_norm((0, 0, 0)))


def test_to_normalized_tensor_custom_stats_and_rgba() -> None:
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # transparent -> white
    t = to_normalized_tensor(image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    _assert_close(t, torch.ones(3, 2, 2))


@pytest.mark.parametrize(
    ("mean", "std"),
    [
        ((0.5, 0.5), (0.5, 0.5, 0.5)),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5, 0.5)),
        ((0, 0, 0), (1, 0, 1)),
    ],
)
def test_to_normalized_tensor_rejects_bad_stats(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    with pytest.raises(ValueError, match=r"mean|std"):
        to_normalized_tensor(Image.new("RGB", (2, 2)), mean=mean, std=std)


# --------------------------------------------------------------------------------------------
# EvalTransform
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [(640, 480), (480, 640), (300, 300), (33, 32), (5, 3), (3, 5), (1, 1), (1, 40)],
    ids=["landscape", "portrait", "square", "nearly-square", "tiny-l", "tiny-p", "1px", "sliver"],
)
@pytest.mark.parametrize("resolution", [32, 224])
def test_eval_output_shape_and_dtype(size: tuple[int, int], resolution: int) -> None:
    out = eval_transform(resolution)(_noise(*size))
    assert out.shape == (3, resolution, resolution)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_eval_centre_region_colour() -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (70, 20, 130, 80))  # red 60x60 square around the centre
    out = eval_transform(32)(image)  # resized to 64x32, crop covers x in [50, 150)
    _assert_close(out[:, 16, 16], _expected_norm((255, 0, 0)))
    _assert_close(out[:, 14:18, 14:18], _expected_norm((255, 0, 0)).view(3, 1, 1).expand(3, 4, 4))
    # the crop's left/right edges lie in the blue margin
    _assert_close(out[:, 16, 0], _expected_norm((0, 0, 255)))
    _assert_close(out[:, 16, 31], _expected_norm((0, 0, 255)))


@pytest.mark.parametrize(
    ("size", "resized", "box"),
    [
        # 97x61 -> shorter side 48 -> 76x48 (int(76.33)); left = round(14.0) = 14
        ((97, 61), (76, 48), (14, 0, 62, 48)),
        # 61x98 -> 48x77 (int(77.11)); top = round(14.5) = 14 (round-half-even, as torchvision)
        ((61, 98), (48, 77), (0, 14, 48, 62)),
        # 101x61 -> 79x48 (int(79.48)); left = round(15.5) = 16 (half-to-even rounds up here)
        ((101, 61), (79, 48), (16, 0, 64, 48)),
        # upsampling: 20x15 -> 64x48 (int(64.0)); left = 8
        ((20, 15), (64, 48), (8, 0, 56, 48)),
    ],
)
def test_eval_matches_direct_pil_computation(
    size: tuple[int, int], resized: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    image = _noise(*size, seed=7)
    expected = image.resize(resized, Image.Resampling.BICUBIC).crop(box)
    out = eval_transform(48)(image)
    assert torch.equal(out, to_normalized_tensor(expected))
    np.testing.assert_array_equal(_unnormalize(out), np.asarray(expected))


@pytest.mark.parametrize("value", [0, 128, 255])
def test_eval_grey_image_normalisation(value: int) -> None:
    out = eval_transform(24)(Image.new("RGB", (50, 70), (value, value, value)))
    mean = torch.tensor(OPENAI_MEAN)
    std = torch.tensor(OPENAI_STD)
    expected = ((value / 255.0 - mean) / std).view(3, 1, 1).expand(3, 24, 24)
    _assert_close(out, expected)


def test_eval_converts_non_rgb_modes() -> None:
    grey = Image.new("L", (40, 30), 100)
    _assert_close(
        eval_transform(16)(grey), eval_transform(16)(Image.new("RGB", (40, 30), (100,) * 3))
    )
    rgba = Image.new("RGBA", (40, 30), (9, 9, 9, 0))  # fully transparent -> white
    _assert_close(
        eval_transform(16)(rgba), _expected_norm((255, 255, 255)).view(3, 1, 1).expand(3, 16, 16)
    )


def test_eval_custom_stats_and_validation() -> None:
    t = EvalTransform(8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = t(Image.new("RGB", (10, 10), (255, 0, 51)))
    _assert_close(out[:, 4, 4], torch.tensor([1.0, 0.0, 0.2]))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="resolution"):
            EvalTransform(bad)
    with pytest.raises(ValueError, match="resolution"):
        eval_transform(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mean"):
        EvalTransform(8, mean=(0.5, 0.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std"):
        EvalTransform(8, std=(0.5, -0.5, 0.5))
    with pytest.raises(ValueError, match="zero area"):
        eval_transform(8)(Image.new("RGB", (0, 5)))


# --------------------------------------------------------------------------------------------
# TrainTransform
# --------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_train_seeded_generator_is_reproducible() -> None:
    image = _noise(120, 90)
    t = train_transform(32, scale=(0.3, 1.0))
    assert torch.equal(t(image, _gen(123)), t(image, _gen(123)))


def test_train_global_rng_is_seedable() -> None:
    image = _noise(120, 90)
    t = train_transform(32, scale=(0.3, 1.0))
    torch.manual_seed(5)
    first = t(image)
    torch.manual_seed(5)
    assert torch.equal(t(image), first)


def test_train_different_seeds_give_different_crops() -> None:
    image = _noise(120, 90)
    t = train_transform(32, scale=(0.3, 1.0))
    crops = {t.sample_crop(120, 90, _gen(seed)) for seed in range(10)}
    assert len(crops) > 5
    assert not torch.equal(t(image, _gen(1)), t(image, _gen(2)))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (64, 64), (7, 3), (1, 1), (2, 50)])
@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0), (1.0, 1.0)])
def test_train_output_shape(size: tuple[int, int], scale: tuple[float, float]) -> None:
    out = train_transform(24, scale=scale)(_noise(*size), _gen(0))
    assert out.shape == (3, 24, 24)
    assert out.dtype == torch.float32


def test_train_crop_boxes_stay_inside_and_respect_scale() -> None:
    t = train_transform(16, scale=(0.5, 0.6))
    rng = np.random.default_rng(0)
    g = _gen(0)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(1, 400, size=2))
        left, top, side = t.sample_crop(w, h, g)
        short = min(w, h)
        assert 1 <= side <= short
        assert max(1, round(0.5 * short)) <= side <= max(1, round(0.6 * short))
        assert 0 <= left <= w - side
        assert 0 <= top <= h - side


def test_train_crop_of_full_scale_keeps_border() -> None:
    """With scale (1, 1) the square spans the full short side, so the border must survive."""
    image = Image.new("RGB", (80, 64), (255, 0, 0))  # red border ...
    image.paste((0, 255, 0), (2, 2, 78, 62))  # ... around a green interior
    t = train_transform(64, scale=(1.0, 1.0))  # side 64 == resolution: no resampling
    red = _expected_norm((255, 0, 0)).view(3, 1)
    lefts = set()
    for seed in range(20):
        left, top, side = t.sample_crop(80, 64, _gen(seed))
        assert (top, side) == (0, 64)
        lefts.add(left)
        out = t(image, _gen(seed))
        _assert_close(out[:, 0, :], red.expand(3, 64))  # top border row
        _assert_close(out[:, 63, :], red.expand(3, 64))  # bottom border row
        expected = np.asarray(image.crop((left, 0, left + 64, 64)))
        np.testing.assert_array_equal(_unnormalize(out), expected)
    assert len(lefts) > 1  # horizontal position really is random


def test_train_crop_never_reads_outside_image() -> None:
    """Out-of-bounds crops would pad with black; a constant white image must stay white."""
    image = Image.new("RGB", (37, 91), (255, 255, 255))
    t = train_transform(20, scale=(0.05, 1.0))
    white = _expected_norm((255, 255, 255)).view(3, 1, 1).expand(3, 20, 20)
    g = _gen(3)
    for _ in range(50):
        _assert_close(t(image, g), white)


def test_train_validation() -> None:
    for bad_scale in [(0.0, 1.0), (0.8, 0.5), (0.5, 1.1), (-0.1, 0.5)]:
        with pytest.raises(ValueError, match="scale"):
            train_transform(32, scale=bad_scale)
    with pytest.raises(ValueError, match="resolution"):
        train_transform(0)
    with pytest.raises(ValueError, match="std"):
        TrainTransform(32, std=(0.0, 1.0, 1.0))
    assert TrainTransform(32).scale == (0.9, 1.0)


# --------------------------------------------------------------------------------------------
# collate_images
# --------------------------------------------------------------------------------------------


def test_collate_stacks_batch() -> None:
    t = eval_transform(16)
    images = [t(_noise(30, 20, seed=i)) for i in range(4)]
    batch = collate_images(images)
    assert batch.shape == (4, 3, 16, 16)
    assert batch.dtype == torch.float32
    _assert_close(batch[2], images[2])


def test_collate_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate_images([])
    with pytest.raises(ValueError, match=r"images\[1\].*\(3, 8, 8\)"):
        collate_images([torch.zeros(3, 16, 16), torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="dtype"):
        collate_images([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="C, H, W"):
        collate_images([torch.zeros(16, 16)])


def _bomb_png() -> bytes:
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 10)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)


@pytest.mark.parametrize(
    "case", ["ok", "truncated_jpeg", "corrupt_png", "empty", "not_image", "bomb", "palette"]
)
def test_verify_image_agrees_with_decode_image(case: str) -> None:
    """verify_image (ingest's check, no RGB copy) accepts and rejects exactly like decode_image."""
    jpeg = _encode(_noise(48, 32), "JPEG")
    corrupt = bytearray(_encode(_noise(32, 32), "PNG"))
    corrupt[60:200] = b"\xff" * 140
    data = {
        "ok": jpeg,
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "corrupt_png": bytes(corrupt),
        "empty": b"",
        "not_image": b"hello world, not an image",
        "bomb": _bomb_png(),
        "palette": _encode(_noise(20, 10).convert("P"), "PNG", transparency=0),
    }[case]
    try:
        expected: Any = decode_image(data, max_pixels=10_000_000).size
    except (ImageDecodeError, ImageTooLargeError) as exc:
        expected = type(exc)
    try:
        got: Any = verify_image(data, max_pixels=10_000_000)
    except (ImageDecodeError, ImageTooLargeError) as exc:
        got = type(exc)
    assert got == expected
    assert (case in ("ok", "palette")) == isinstance(got, tuple)


# --------------------------------------------------------------------------------------------
# uint8 pixels, normalised later (the training pipeline's contract)
# --------------------------------------------------------------------------------------------


def test_train_pixels_normalised_as_a_batch_equal_the_float_transform_exactly() -> None:
    t = TrainTransform(32, scale=(0.5, 1.0))
    images = [_noise(40 + 7 * i, 36 + 3 * i, seed=i) for i in range(4)]
    floats = torch.stack(
        [t(im, generator=torch.Generator().manual_seed(i)) for i, im in enumerate(images)]
    )  # [4, 3, 32, 32]
    pixels = torch.stack(
        [t.pixels(im, generator=torch.Generator().manual_seed(i)) for i, im in enumerate(images)]
    )  # [4, 3, 32, 32] uint8
    assert pixels.dtype == torch.uint8 and pixels.is_contiguous()
    assert torch.equal(normalize_pixels(pixels), floats)  # bit for bit, same crops


def test_uint8_tensor_is_channel_first_rgb() -> None:
    rgba = Image.new("RGBA", (5, 4), (10, 20, 30, 0))  # fully transparent: white
    pixels = to_uint8_tensor(rgba)
    assert pixels.shape == (3, 4, 5) and pixels.dtype == torch.uint8
    assert pixels.unique().tolist() == [255]
    arr = np.asarray(_noise(6, 3))
    expected = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, H, W]
    assert torch.equal(to_uint8_tensor(Image.fromarray(arr)), expected)


def test_normalize_pixels_refuses_floats_and_bad_shapes() -> None:
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        normalize_pixels(torch.zeros(2, 4, 4, 4, dtype=torch.uint8))
