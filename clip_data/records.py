"""The record every source yields, before any validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

SPLITS = ("train", "val", "test")


class BytesLoader(Protocol):
    """Reads a file's bytes on demand (``None`` when the file does not exist).

    Implementations must be picklable: ingest worker processes call :meth:`read`, so image
    bytes never pass through the process that reads the source.
    """

    def read(self) -> bytes | None:
        """The bytes, ``None`` if missing; raises for any other read failure."""
        ...


@dataclass(frozen=True)
class RawRecord:
    """One image-text pair exactly as a source holds it.

    ``image`` and ``caption`` are the raw bytes as read (``None`` when the source has no image
    or no caption for this key: a validation failure, never silently dropped). ``problem`` is
    set by a source that already knows the record is unusable (e.g. an unsafe tar member
    name); such records go straight to quarantine with that reason.

    A source asked for lazy images (``open_source(..., lazy_images=True)``) leaves ``image``
    (and, for a folder source, ``caption``) as ``None`` and sets ``image_loader`` (and
    ``caption_loader``) instead; :meth:`loaded` reads them.
    """

    key: str
    image: bytes | None
    caption: bytes | None
    source: str
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    image_loader: BytesLoader | None = None
    caption_loader: BytesLoader | None = None

    def loaded(self) -> RawRecord:
        """This record with its image and caption read (itself when it has no loaders)."""
        if self.image_loader is None and self.caption_loader is None:
            return self
        image = self.image if self.image_loader is None else self.image_loader.read()
        caption = self.caption if self.caption_loader is None else self.caption_loader.read()
        return dataclasses.replace(
            self, image=image, caption=caption, image_loader=None, caption_loader=None
        )
