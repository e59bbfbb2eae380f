"""Tests for clip_data.checks: each reason code from a crafted input; good images kept as-is."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clip_data.checks import REASONS, CheckConfig, CheckedRecord, Rejection, check_record
from clip_data.records import RawRecord

DEFAULT = CheckConfig()


def _encode(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """A ``width x height`` RGB noise image encoded as ``fmt`` (PNG or JPEG)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _bilevel_png(width: int, height: int, with_pixels: bool = True) -> bytes:
    """A hand-written 1-bit all-black PNG declaring ``width x height``.

    With ``with_pixels=False`` there is no IDAT at all: only the header declares the canvas,
    which is all a decompression-bomb check should ever look at.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = [_chunk(b"IHDR", ihdr)]
    if with_pixels:
        scanline = b"\x00" * (1 + (width + 7) // 8)
        chunks.append(_chunk(b"IDAT", zlib.compress(scanline * height, 9)))
    chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


GOOD_PNG = _encode(40, 30, "PNG")
GOOD_JPEG = _encode(48, 32, "JPEG", seed=1)


def _raw(
    image: bytes | None = GOOD_PNG,
    caption: bytes | None = b"a photo of a cat",
    **kwargs: Any,
) -> RawRecord:
    return RawRecord(key="k1", image=image, caption=caption, source="src", **kwargs)


def _reason(record: RawRecord, config: CheckConfig = DEFAULT) -> Rejection:
    result = check_record(record, config)
    assert isinstance(result, Rejection), f"expected a rejection, got {result!r}"
    assert result.reason in REASONS
    assert (result.key, result.source, result.split) == (record.key, record.source, record.split)
    assert result.detail
    return result


# ------------------------------------------------------------------------------ accepted


@pytest.mark.parametrize(("data", "size"), [(GOOD_PNG, (40, 30)), (GOOD_JPEG, (48, 32))])
def test_good_image_accepted_with_original_bytes(data: bytes, size: tuple[int, int]) -> None:
    record = _raw(data, b"  a photo\tof a cat \n", split="val", extra={"url": "http://x/1"})
    result = check_record(record, DEFAULT)
    assert isinstance(result, CheckedRecord)
    assert result.image == data  # byte-for-byte, not re-encoded
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (result.width, result.height) == size
    assert result.caption == "a photo\tof a cat"  # stripped, inner whitespace kept
    assert (result.key, result.source, result.split) == ("k1", "src", "val")
    assert result.extra == {"url": "http://x/1"}


def test_accepts_non_ascii_caption() -> None:
    result = check_record(_raw(caption="café ☕".encode()), DEFAULT)
    assert isinstance(result, CheckedRecord)
    assert result.caption == "café ☕"


# ------------------------------------------------------------------------------ image reasons


def test_zero_byte_image() -> None:
    assert _reason(_raw(b"")).reason == "empty_image"


@pytest.mark.parametrize("data", [GOOD_PNG, GOOD_JPEG], ids=["png", "jpeg"])
def test_truncated_image(data: bytes) -> None:
    rejection = _reason(_raw(data[: len(data) // 2]))
    assert rejection.reason == "decode_error"


def test_text_bytes_are_not_an_image() -> None:
    assert _reason(_raw(b"this is a caption, not an image" * 10)).reason == "decode_error"


def test_decompression_bomb_from_header() -> None:
    bomb = _bilevel_png(30_000, 30_000, with_pixels=False)
    assert len(bomb) < 100
    rejection = _reason(_raw(bomb))
    assert rejection.reason == "decompression_bomb"


def test_bomb_limit_is_config_max_pixels() -> None:
    data = _encode(100, 100, "PNG")
    config = CheckConfig(max_pixels=5_000)
    assert _reason(_raw(data), config).reason == "decompression_bomb"
    assert isinstance(check_record(_raw(data), CheckConfig(max_pixels=10_000)), CheckedRecord)


def test_too_small() -> None:
    assert _reason(_raw(_encode(4, 4, "PNG"))).reason == "too_small"
    assert _reason(_raw(_encode(40, 7, "PNG"))).reason == "too_small"
    assert isinstance(check_record(_raw(_encode(8, 8, "PNG")), DEFAULT), CheckedRecord)


def test_too_large_side_default_limit() -> None:
    # 16385 x 8: few pixels, but one side over the default max_side of 16384.
    rejection = _reason(_raw(_bilevel_png(16_385, 8)))
    assert rejection.reason == "too_large"
    assert "16385x8" in rejection.detail


def test_too_large_side_configured() -> None:
    data = _encode(100, 60, "PNG")
    assert _reason(_raw(data), CheckConfig(max_side=64)).reason == "too_large"
    assert isinstance(check_record(_raw(data), CheckConfig(max_side=100)), CheckedRecord)


def test_bad_aspect() -> None:
    assert _reason(_raw(_bilevel_png(1000, 10))).reason == "bad_aspect"
    assert _reason(_raw(_bilevel_png(10, 1000))).reason == "bad_aspect"
    # exactly at the limit is accepted
    assert isinstance(check_record(_raw(_bilevel_png(200, 10)), DEFAULT), CheckedRecord)


def test_missing_image() -> None:
    assert _reason(_raw(None)).reason == "missing_image"


def test_image_of_wrong_type_is_rejected_not_raised() -> None:
    record = RawRecord(key="k", image="not bytes", caption=b"x", source="s")  # type: ignore[arg-type]
    assert _reason(record).reason == "decode_error"


# ------------------------------------------------------------------------------ caption reasons


@pytest.mark.parametrize("caption", [b"", b"   ", b" \t\n\r ", "\u3000\u00a0".encode()])
def test_empty_or_whitespace_caption(caption: bytes) -> None:
    assert _reason(_raw(caption=caption)).reason == "caption_empty"


def test_caption_below_configured_minimum() -> None:
    config = CheckConfig(min_caption_chars=5)
    assert _reason(_raw(caption=b" cat "), config).reason == "caption_empty"
    assert isinstance(check_record(_raw(caption=b"a cat"), config), CheckedRecord)


def test_caption_not_utf8_reports_offset() -> None:
    rejection = _reason(_raw(caption=b"caf\xe9"))
    assert rejection.reason == "caption_not_utf8"
    assert "byte offset 3" in rejection.detail


def test_caption_too_long() -> None:
    assert _reason(_raw(caption=b"x" * 100_000)).reason == "caption_too_long"
    config = CheckConfig(max_caption_chars=10)
    assert _reason(_raw(caption=("é" * 11).encode()), config).reason == "caption_too_long"
    # the bound counts characters after stripping, not bytes
    assert isinstance(check_record(_raw(caption=("  " + "é" * 10).encode()), config), CheckedRecord)


def test_caption_not_utf8_checked_before_image_decode() -> None:
    assert _reason(_raw(b"garbage", caption=b"\xff")).reason == "caption_not_utf8"


def test_missing_caption() -> None:
    assert _reason(_raw(caption=None)).reason == "missing_caption"


# ------------------------------------------------------------------------------ record reasons


def test_unsafe_member_problem() -> None:
    rejection = _reason(_raw(problem="unsafe tar member name '../../etc/passwd'"))
    assert rejection.reason == "unsafe_member"
    assert "../../etc/passwd" in rejection.detail


@pytest.mark.parametrize("split", ["training", "", "TRAIN"])
def test_bad_split(split: str) -> None:
    assert _reason(_raw(split=split)).reason == "bad_split"


def test_every_reason_code_is_reachable() -> None:
    """The crafted inputs above cover the whole reason vocabulary."""
    inputs = [
        _raw(problem="bad"),
        _raw(None),
        _raw(caption=None),
        _raw(b""),
        _raw(b"not an image"),
        _raw(_bilevel_png(30_000, 30_000, with_pixels=False)),
        _raw(_encode(4, 4, "PNG")),
        _raw(_bilevel_png(16_385, 8)),
        _raw(_bilevel_png(1000, 10)),
        _raw(caption=b"caf\xe9"),
        _raw(caption=b" "),
        _raw(caption=b"x" * 100_000),
        _raw(split="nope"),
    ]
    assert sorted(_reason(r).reason for r in inputs) == sorted(REASONS)


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_side": 0},
        {"min_side": 100, "max_side": 50},
        {"max_side": -1},
        {"max_pixels": 0},
        {"min_side": 100, "max_pixels": 9_999},
        {"max_aspect": 0.5},
        {"max_aspect": float("inf")},
        {"max_aspect": float("nan")},
        {"min_caption_chars": 0},
        {"min_caption_chars": 10, "max_caption_chars": 5},
        {"max_caption_chars": 1.5},
        {"min_side": True},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CheckConfig(**kwargs)


# ------------------------------------------------------ the verifying decode (verify_image)


def _jpeg(mode: str, **save: Any) -> bytes:
    """A 40x24 noise JPEG in ``mode`` (``RGB``, ``L`` or ``CMYK``)."""
    rng = np.random.default_rng(7)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size=(24, 40, channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _corrupt(data: bytes, marker: bytes, offset: int, garbage: bytes) -> bytes:
    """``data`` with ``garbage`` written ``offset`` bytes after the first ``marker``."""
    start = data.index(marker) + offset
    return data[:start] + garbage + data[start + len(garbage) :]


def _decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """Record (decoder, output mode, JPEG DCT scale) of every pixel decoder Pillow creates."""
    calls: list[tuple[str, str, int]] = []
    original = Image._getdecoder

    def counting(mode: str, decoder_name: str, args: Any, extra: Any = ()) -> Any:
        output = args[0] if isinstance(args, tuple) and args else mode
        scale = int(extra[0]) if decoder_name == "jpeg" and extra else 1
        calls.append((decoder_name, output, scale))
        return original(mode, decoder_name, args, extra)

    monkeypatch.setattr(Image, "_getdecoder", counting)
    return calls


def _verdicts(data: bytes) -> tuple[Any, Any]:
    """(verify_image's verdict, decode_image's): the size, or the error message."""
    from clip_core.transforms import ImageDecodeError, decode_image, verify_image

    verdicts: list[Any] = []
    for decode in (verify_image, lambda d: decode_image(d).size):
        try:
            verdicts.append(decode(data))
        except ImageDecodeError as error:
            verdicts.append(str(error))
    return verdicts[0], verdicts[1]


@pytest.mark.parametrize(
    ("case", "accepted"),
    [
        ("rgb", True),
        ("grey", True),
        ("cmyk", True),
        ("stored_as_rgb", True),  # Adobe RGB-coded: libjpeg cannot output it as YCbCr
        ("progressive", True),
        ("truncated", False),
        ("eoi_in_scan", True),  # libjpeg only warns (premature end): both decodes accept it
        ("bad_marker_in_scan", False),
        ("bad_huffman_table", False),
        ("truncated_png", False),
    ],
)
def test_verify_accepts_and_rejects_like_the_rgb_decode(case: str, accepted: bool) -> None:
    """verify_image's reduced JPEG decode never changes a verdict, a size or an error message."""

    rgb = _jpeg("RGB")
    data = {
        "rgb": rgb,
        "grey": _jpeg("L"),
        "cmyk": _jpeg("CMYK"),
        "stored_as_rgb": _jpeg("RGB", keep_rgb=True),
        "progressive": _jpeg("RGB", progressive=True),
        "truncated": rgb[: len(rgb) * 2 // 3],
        "eoi_in_scan": _corrupt(rgb, b"\xff\xda", 20, b"\xff\xd9" * 30),
        "bad_marker_in_scan": _corrupt(rgb, b"\xff\xda", 20, b"\xff\xc5"),
        "bad_huffman_table": _corrupt(rgb, b"\xff\xc4", 5, b"\xff" * 20),
        "truncated_png": GOOD_PNG[: len(GOOD_PNG) - 40],
    }[case]
    got, expected = _verdicts(data)
    assert got == expected
    assert isinstance(got, tuple) == accepted
    result = check_record(_raw(image=data), DEFAULT)
    assert isinstance(result, CheckedRecord) == accepted
    if not accepted:
        assert isinstance(result, Rejection) and result.reason == "decode_error"


def test_a_good_jpeg_is_decoded_exactly_once_at_reduced_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _decodes(monkeypatch)
    assert isinstance(check_record(_raw(image=GOOD_JPEG), DEFAULT), CheckedRecord)
    assert calls == [("jpeg", "YCbCr", 8)]  # every coefficient, pixels at 1/8 scale
    calls.clear()
    result = check_record(_raw(image=_jpeg("L")), DEFAULT)
    assert isinstance(result, CheckedRecord) and (result.width, result.height) == (40, 24)
    assert calls == [("jpeg", "L", 8)]
    calls.clear()
    assert isinstance(check_record(_raw(image=GOOD_PNG), DEFAULT), CheckedRecord)
    assert [name for name, _, _ in calls] == ["zip"]  # other formats: one ordinary decode


def test_a_bad_jpeg_is_decoded_again_the_ordinary_way(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _decodes(monkeypatch)
    result = check_record(_raw(image=GOOD_JPEG[: len(GOOD_JPEG) // 2]), DEFAULT)
    assert isinstance(result, Rejection) and result.reason == "decode_error"
    assert "truncated" in result.detail
    assert calls == [("jpeg", "YCbCr", 8), ("jpeg", "RGB", 1)]


def _damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with one random kind of damage inside its entropy-coded data (after SOS)."""
    out = bytearray(data)
    start = out.index(b"\xff\xda") + 2
    at = int(rng.integers(start, len(out) - 2))
    span = int(rng.integers(1, 300))
    kind = int(rng.integers(6))
    if kind == 0:  # a few flipped bits
        for p in rng.integers(start, len(out) - 2, size=int(rng.integers(1, 4))):
            out[int(p)] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # one byte replaced
        out[at] = int(rng.integers(256))
    elif kind == 2:  # a run of zeros
        out[at : at + 64] = bytes(len(out[at : at + 64]))
    elif kind == 3:  # bytes cut out
        del out[at : at + span]
    elif kind == 4:  # truncated
        del out[at:]
    else:  # bytes repeated
        out[at:at] = out[at : at + span]
    return bytes(out)


def test_reduced_decode_gives_the_ordinary_verdict_on_damaged_jpegs() -> None:
    """1,200 JPEGs damaged in their scans (baseline, progressive, grey, restart markers,
    every chroma subsampling): verify_image accepts exactly those decode_image accepts, with
    the same size, and otherwise raises the same message."""

    rng = np.random.default_rng(2026)
    originals = []
    for i in range(24):
        size = (int(rng.integers(8, 120)), int(rng.integers(8, 120)))
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize(size)
        if i % 4 == 3:
            image = image.convert("L")
        buf = io.BytesIO()
        image.save(
            buf,
            format="JPEG",
            quality=int(rng.choice([50, 75, 90, 95])),
            progressive=bool(i % 2),
            subsampling=int(rng.integers(3)),
            restart_marker_blocks=4 if i % 5 == 0 else 0,
        )
        originals.append(buf.getvalue())
    verdicts = {True: 0, False: 0}
    for n in range(1200):
        data = _damaged(originals[n % len(originals)], rng)
        got, expected = _verdicts(data)
        assert got == expected, (n, got, expected)
        verdicts[isinstance(got, tuple)] += 1
    assert min(verdicts.values()) > 200, verdicts  # both verdicts well represented
