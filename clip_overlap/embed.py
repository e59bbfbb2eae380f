"""Image embeddings for duplicate detection: the dedicated detector or a CLIP image tower.

Both give L2-normalised float32 vectors, so faiss inner products are cosine similarities.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_core.dedup import DuplicateDetector, detector_batch
from clip_core.model import CLIP
from clip_core.transforms import EvalTransform, decode_image

ImageLike = Image.Image | bytes


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image as is, encoded bytes decoded (RGB)."""
    return image if isinstance(image, Image.Image) else decode_image(image)


@dataclass
class DetectorEmbedder:
    """The dedicated near-duplicate detector (see :mod:`clip_core.dedup`)."""

    model: DuplicateDetector
    name: str = "detector"

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.model.config.embed_dim

    @torch.no_grad()
    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images -> normalised embeddings [B, D]."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = detector_batch([to_pil(im) for im in images], self.model.config.image_size)
        return self.model(x).numpy().astype(np.float32)  # [B, D]


@dataclass
class ClipEmbedder:
    """A CLIP image tower (projected, normalised embeddings): the paper's baseline detector."""

    model: CLIP
    name: str = "clip"

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.model.config.embed_dim

    @torch.no_grad()
    def embed(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images -> normalised embeddings [B, D]."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        transform = EvalTransform(self.model.image_size)
        x = torch.stack([transform(to_pil(im)) for im in images])  # [B, 3, R, R]
        return F.normalize(self.model.encode_image(x), dim=-1).numpy().astype(np.float32)


Embedder = DetectorEmbedder | ClipEmbedder


def embed_all(embedder: Embedder, images: Sequence[ImageLike], batch: int = 128) -> np.ndarray:
    """Embeddings [N, D] of a list of images, in batches."""
    parts = [embedder.embed(images[i : i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)


def embed_batches(
    embedder: Embedder, batches: Iterator[Sequence[ImageLike]]
) -> Iterator[np.ndarray]:
    """Lazily embed a stream of image batches: one [B, D] array per batch."""
    for images in batches:
        yield embedder.embed(images)
