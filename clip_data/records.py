"""The record every source yields, before any validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RawRecord:
    """One image-text pair exactly as a source holds it.

    ``image`` and ``caption`` are the raw bytes as read (``None`` when the source has no image
    or no caption for this key: a validation failure, never silently dropped). ``problem`` is
    set by a source that already knows the record is unusable (e.g. an unsafe tar member
    name); such records go straight to quarantine with that reason.
    """

    key: str
    image: bytes | None
    caption: bytes | None
    source: str
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
