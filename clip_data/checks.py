"""Per-record validation for ingest: every raw record becomes an accepted row or a rejection.

:func:`check_record` never raises for bad *data*: a record that fails any check comes back as a
:class:`Rejection` with a short ``reason`` code (one of :data:`REASONS`) and a human-readable
``detail``. Thresholds live in :class:`CheckConfig` so they are configuration, not code.

Images are decoded with :func:`clip_core.images.verify_image` (bomb-checked against
``CheckConfig.max_pixels``) only to prove they decode: it gives exactly
:func:`~clip_core.images.decode_image`'s verdict, decoding every coefficient of a JPEG but
reconstructing its pixels at 1/8 scale. The accepted row keeps the *original* encoded bytes
(no re-encode) together with the declared size and the SHA-256 of those bytes.

Check order (the first failing check decides the reason): source-reported ``problem``, split,
missing image, missing caption, caption (UTF-8, empty, length), image (empty, decode, size,
aspect ratio). Cheap checks run first so a bad caption never pays for an image decode.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from clip_core.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    verify_image,
)
from clip_data.records import SPLITS, RawRecord

#: Formats an ingest can re-encode images to (``CheckConfig.reencode``), to Pillow's names.
REENCODE_FORMATS: dict[str, str] = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

__all__ = ["REASONS", "CheckConfig", "CheckedRecord", "Rejection", "check_record"]

#: Every reason code a :class:`Rejection` can carry.
REASONS: tuple[str, ...] = (
    "unsafe_member",
    "missing_image",
    "missing_caption",
    "empty_image",
    "decode_error",
    "decompression_bomb",
    "too_small",
    "too_large",
    "bad_aspect",
    "caption_not_utf8",
    "caption_empty",
    "caption_too_long",
    "bad_split",
)

_BYTES_LIKE = (bytes, bytearray, memoryview)


def _positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int (not bool) > 0, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


@dataclass(frozen=True)
class CheckConfig:
    """Validation thresholds.

    Attributes:
        min_side: Smallest accepted image width and height, in pixels.
        max_side: Largest accepted image width and height, in pixels.
        max_pixels: Largest accepted ``width * height``; also the decompression-bomb limit
            passed to :func:`~clip_core.images.decode_image` (checked from the header
            before any pixel data is decoded).
        max_aspect: Largest accepted ``max(w, h) / min(w, h)``.
        min_caption_chars: Fewest characters (code points) a caption may have after
            stripping surrounding whitespace. Shorter captions are rejected as
            ``caption_empty``.
        max_caption_chars: Most characters a caption may have after stripping.
        reencode: ``None`` (default) keeps the image bytes exactly as received; a format
            from :data:`REENCODE_FORMATS` re-encodes every accepted image (as RGB) to it, and
            ``sha256`` is then of the new bytes.
        reencode_quality: JPEG/WebP quality when re-encoding.
    """

    min_side: int = 8
    max_side: int = 16384
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = 20.0
    min_caption_chars: int = 1
    max_caption_chars: int = 4096
    reencode: str | None = None
    reencode_quality: int = 95

    def __post_init__(self) -> None:
        """Reject inconsistent or non-sensical thresholds with a clear ``ValueError``."""
        _positive_int("min_side", self.min_side)
        _positive_int("max_side", self.max_side)
        _positive_int("max_pixels", self.max_pixels)
        _positive_int("min_caption_chars", self.min_caption_chars)
        _positive_int("max_caption_chars", self.max_caption_chars)
        if self.reencode is not None and self.reencode not in REENCODE_FORMATS:
            raise ValueError(
                f"reencode must be None or one of {list(REENCODE_FORMATS)}, got {self.reencode!r}"
            )
        if not 1 <= self.reencode_quality <= 100:
            raise ValueError(f"reencode_quality must be in 1..100, got {self.reencode_quality}")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        if self.min_side * self.min_side > self.max_pixels:
            raise ValueError(
                f"max_pixels ({self.max_pixels}) is below min_side**2 ({self.min_side**2}): "
                "no image could pass"
            )
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError(
                f"min_caption_chars ({self.min_caption_chars}) must be <= "
                f"max_caption_chars ({self.max_caption_chars})"
            )
        aspect = self.max_aspect
        if isinstance(aspect, bool) or not isinstance(aspect, int | float):
            raise ValueError(f"max_aspect must be a number, got {type(aspect).__name__}")
        if not math.isfinite(aspect) or aspect < 1.0:
            raise ValueError(f"max_aspect must be finite and >= 1, got {aspect}")


@dataclass(frozen=True)
class CheckedRecord:
    """An accepted row: original image bytes, cleaned caption and verified metadata.

    ``image`` is byte-for-byte what the source held; ``sha256`` is its hex digest;
    ``width``/``height`` come from the decoded image; ``caption`` is stripped UTF-8 text.
    """

    key: str
    image: bytes
    caption: str
    width: int
    height: int
    sha256: str
    source: str
    split: str
    extra: dict[str, Any]


@dataclass(frozen=True)
class Rejection:
    """A quarantined record: which one, and why (``reason`` is one of :data:`REASONS`)."""

    key: str
    source: str
    split: str
    reason: str
    detail: str


def _reject(record: RawRecord, reason: str, detail: str) -> Rejection:
    """Build a :class:`Rejection` for ``record`` (fields coerced to ``str`` defensively)."""
    return Rejection(
        key=str(record.key),
        source=str(record.source),
        split=str(record.split),
        reason=reason,
        detail=detail,
    )


def _check_caption(record: RawRecord, raw: bytes, config: CheckConfig) -> str | Rejection:
    """Decode, strip and bound the caption; return the text or a :class:`Rejection`."""
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.end]
        return _reject(
            record,
            "caption_not_utf8",
            f"caption is not valid UTF-8: {exc.reason} at byte offset {exc.start} "
            f"(byte(s) {bad.hex()})",
        )
    caption = text.strip()
    if len(caption) < config.min_caption_chars:
        if not caption:
            what = "empty" if not text else f"whitespace only ({len(text)} chars)"
            return _reject(record, "caption_empty", f"caption is {what}")
        return _reject(
            record,
            "caption_empty",
            f"caption has {len(caption)} chars after stripping, below "
            f"min_caption_chars={config.min_caption_chars}",
        )
    if len(caption) > config.max_caption_chars:
        return _reject(
            record,
            "caption_too_long",
            f"caption has {len(caption)} chars after stripping, over "
            f"max_caption_chars={config.max_caption_chars}",
        )
    return caption


def _check_image(  # noqa: PLR0911 - one early return per reason code
    record: RawRecord, data: bytes, config: CheckConfig
) -> tuple[int, int, bytes] | Rejection:
    """Decode ``data`` to verify it; ``(width, height, bytes to store)`` or a Rejection."""
    if len(data) == 0:
        return _reject(record, "empty_image", "image is 0 bytes")
    decoded: Image.Image | None = None
    try:
        if config.reencode is None:  # verify only: no RGB copy of the pixels
            width, height = verify_image(data, max_pixels=config.max_pixels)
        else:
            decoded = decode_image(data, max_pixels=config.max_pixels)
            width, height = decoded.size
    except ImageTooLargeError as exc:
        return _reject(record, "decompression_bomb", str(exc))
    except ImageDecodeError as exc:
        return _reject(record, "decode_error", str(exc))
    except Exception as exc:  # safety net: any other failure to decode is about the data too
        return _reject(record, "decode_error", f"{type(exc).__name__}: {exc}")
    if decoded is not None:
        data = _encode(decoded, str(config.reencode), config.reencode_quality)
        decoded.close()
    if width < config.min_side or height < config.min_side:
        return _reject(
            record, "too_small", f"image is {width}x{height}, below min_side={config.min_side}"
        )
    if width > config.max_side or height > config.max_side:
        return _reject(
            record, "too_large", f"image is {width}x{height}, over max_side={config.max_side}"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > config.max_aspect:
        return _reject(
            record,
            "bad_aspect",
            f"image is {width}x{height}, aspect ratio {aspect:.3g} over "
            f"max_aspect={config.max_aspect}",
        )
    return width, height, data


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    """``image`` (RGB, as decoded) encoded as ``fmt`` with no metadata."""
    buf = io.BytesIO()
    image.save(buf, format=REENCODE_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def check_record(  # noqa: PLR0911 - one early return per reason code
    record: RawRecord, config: CheckConfig
) -> CheckedRecord | Rejection:
    """Validate one raw record: an accepted :class:`CheckedRecord` or a :class:`Rejection`.

    Never raises for bad data (corrupt, truncated, huge or mistyped images; undecodable,
    empty or oversized captions; unknown splits; source-reported problems): each becomes a
    :class:`Rejection` whose ``reason`` is one of :data:`REASONS`. A record with an
    ``image_loader`` has its image read first; a failure to read it (other than a missing
    file) is not bad data and raises the loader's error (a short ``SourceError``).
    """
    if record.problem is not None:
        return _reject(record, "unsafe_member", str(record.problem))
    if not isinstance(record.split, str) or record.split not in SPLITS:
        return _reject(
            record, "bad_split", f"split {record.split!r} is not one of {', '.join(SPLITS)}"
        )
    record = record.loaded()  # a lazy source's image is read here (an I/O error raises)
    if record.image is None:
        return _reject(record, "missing_image", "source has no image for this key")
    if record.caption is None:
        return _reject(record, "missing_caption", "source has no caption for this key")
    if not isinstance(record.image, _BYTES_LIKE):
        return _reject(
            record, "decode_error", f"image is a {type(record.image).__name__}, not bytes"
        )
    if not isinstance(record.caption, _BYTES_LIKE):
        return _reject(
            record,
            "caption_not_utf8",
            f"caption is a {type(record.caption).__name__}, not UTF-8 bytes",
        )

    caption = _check_caption(record, bytes(record.caption), config)
    if isinstance(caption, Rejection):
        return caption
    checked = _check_image(record, bytes(record.image), config)
    if isinstance(checked, Rejection):
        return checked
    width, height, image = checked
    return CheckedRecord(
        key=str(record.key),
        image=image,
        caption=caption,
        width=width,
        height=height,
        sha256=hashlib.sha256(image).hexdigest(),
        source=str(record.source),
        split=record.split,
        extra=dict(record.extra),
    )
