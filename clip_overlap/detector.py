"""Training, saving and loading the dedicated near-duplicate detector.

:func:`train_detector` reads up to ``max_images`` pretraining images from the shards, then
for ``steps`` steps draws a batch, makes two random synthetic copies of every image
(:func:`clip_core.dedup.augment_batch`) and minimises our symmetric contrastive (InfoNCE) loss
(:func:`clip_core.loss.contrastive_loss`) between the two views' embeddings, with a fixed
temperature: the other images of the batch are the negatives. The output directory
(``detector.safetensors`` + ``detector.json``) is what ``clipops overlap --detector`` takes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_core.config import reject_unknown_keys
from clip_core.dedup import DetectorConfig, DuplicateDetector, augment_batch, normalise_pixels
from clip_core.loss import contrastive_loss
from clip_core.transforms import decode_image
from clip_overlap.shards import iter_batches

WEIGHTS = "detector.safetensors"
META = "detector.json"
FORMAT = "clipops-dedup-detector/1"


class DetectorError(ValueError):
    """A detector directory is missing or malformed, or training cannot start."""


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Training settings. ``tiny()`` trains on two CPU cores in well under a minute."""

    model: DetectorConfig = field(default_factory=DetectorConfig)
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07
    max_images: int = 20_000
    split: str = "train"
    seed: int = 0
    mine_every: int = 0
    mine_warmup: int = 10
    mine_group: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_images", "mine_group"):
            if int(getattr(self, name)) < 1:
                raise DetectorError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mine_every < 0 or self.mine_warmup < 0:
            raise DetectorError("mine_every and mine_warmup must be >= 0 (mine_every 0: no mining)")
        if self.batch_size < 2:
            raise DetectorError("batch_size must be >= 2 (in-batch negatives)")
        if not 0 < self.temperature <= 1 or self.lr <= 0:
            raise DetectorError("temperature must be in (0, 1] and lr positive")

    @classmethod
    def tiny(cls) -> DetectorTrainConfig:
        """A small detector for CPU tests and demos."""
        return cls(
            model=DetectorConfig(image_size=48, widths=(24, 48, 64), grid=3, embed_dim=64),
            steps=90,
            batch_size=64,
            lr=3e-3,
            max_images=2_000,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DetectorTrainConfig:
        """Build from a dict (``model`` a nested dict); unknown keys are errors."""
        reject_unknown_keys(cls, raw, "detector train key", DetectorError)
        values = dict(raw)
        if "model" in values:
            values["model"] = DetectorConfig.from_dict(dict(values["model"]))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out


def load_images(shards: str, split: str, limit: int) -> list[Image.Image]:
    """Up to ``limit`` decoded RGB images of ``split``, streamed from the shards."""
    images: list[Image.Image] = []
    for batch in iter_batches(shards, split=split, batch_size=256):
        for data in batch.images:
            images.append(decode_image(data))
            if len(images) >= limit:
                return images
    return images


def _pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """Images squashed to size x size, as [N, 3, size, size] in [0, 1]."""
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _jpeg_copies(images: list[Image.Image], rng: np.random.Generator) -> list[Image.Image]:
    """Each image re-encoded once as JPEG at a random quality in [40, 90]."""
    out = []
    for im in images:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(40, 91)))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(decoded.convert("RGB"))
    return out


def _hard_batch(cheap: torch.Tensor, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Half the batch: the images of a random pool most similar to a random anchor (hard
    negatives: similar 8x8 thumbnails); the other half: random images of the pool (so that
    backgrounds and colours still matter).
    """
    n = cheap.shape[0]
    pool = rng.choice(n, size=min(n, 8 * batch), replace=False)
    anchor = cheap[int(rng.integers(n))]
    order = torch.argsort(cheap[pool] @ anchor, descending=True).numpy()
    near = pool[order[: batch // 2]]
    far = pool[order[batch // 2 :]]
    return np.concatenate([near, rng.choice(far, size=batch - near.size, replace=False)])


def _mined_batch(emb: torch.Tensor, batch: int, group: int, rng: np.random.Generator) -> np.ndarray:
    """A batch of groups of mutual nearest neighbours in the current embedding [N, D]: each
    group is a random anchor and the ``group - 1`` images the model finds most similar to
    it (its current confusions: hard negatives), no image twice.
    """
    n = emb.shape[0]
    taken = np.zeros(n, dtype=bool)
    chosen: list[np.ndarray] = []
    count = 0
    for anchor in rng.permutation(n):
        if count >= batch:
            break
        if taken[anchor]:
            continue
        order = torch.argsort(emb @ emb[int(anchor)], descending=True).numpy()  # [N]
        members = order[~taken[order]][: min(group, batch - count)]
        taken[members] = True
        chosen.append(members)
        count += members.size
    return np.concatenate(chosen)


@torch.no_grad()
def _embed_pixels(model: DuplicateDetector, pixels: torch.Tensor) -> torch.Tensor:
    """Eval-mode embeddings [N, D] of [N, 3, S, S] pixels in [0, 1] (model left in train mode)."""
    model.eval()
    parts = [model(normalise_pixels(pixels[i : i + 256])) for i in range(0, pixels.shape[0], 256)]
    model.train()
    return torch.cat(parts)


def train_on_images(
    images: list[Image.Image], config: DetectorTrainConfig
) -> tuple[DuplicateDetector, list[float]]:
    """Train a detector on in-memory images; returns the model (eval mode) and loss per step.

    Each step: a batch of mutually similar images (hard negatives), two augmented views of
    each (one view from a JPEG-recompressed source half of the time), InfoNCE between views.
    Half of each batch is images with similar 8x8 thumbnails. With ``mine_every`` > 0 (off
    by default), after ``mine_warmup`` steps the whole training set is re-embedded every
    ``mine_every`` steps and batches are groups of ``mine_group`` images the model currently
    confuses (online hard negatives; see docs/overlap.md for what it changes).
    """
    if len(images) < 2:
        raise DetectorError(f"need at least 2 training images, got {len(images)}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = DuplicateDetector(config.model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / config.steps))
    )
    source = config.model.image_size  # views resample at the same size: no aliasing
    plain = _pixels(images, source)  # [N, 3, S, S]
    jpeg = _pixels(_jpeg_copies(images, rng), source)  # [N, 3, S, S]
    cheap = F.normalize(F.adaptive_avg_pool2d(plain, 8).flatten(1) - 0.5, dim=-1)  # [N, 192]
    scale = torch.tensor(1.0 / config.temperature)
    batch = min(config.batch_size, len(images))
    size = config.model.image_size
    losses: list[float] = []
    mined: torch.Tensor | None = None  # [N, D] the model's embeddings, refreshed while mining
    model.train()
    for step in range(config.steps):
        since = step - config.mine_warmup
        if config.mine_every and since >= 0 and since % config.mine_every == 0:
            mined = _embed_pixels(model, plain)
        if mined is None:
            chosen = torch.from_numpy(_hard_batch(cheap, batch, rng))
        else:
            chosen = torch.from_numpy(_mined_batch(mined, batch, config.mine_group, rng))
        use_jpeg = torch.rand(batch, 1, 1, 1, generator=gen) < 0.5  # [B, 1, 1, 1]
        second = torch.where(use_jpeg, jpeg[chosen], plain[chosen])  # [B, 3, S, S]
        views = augment_batch(torch.cat([plain[chosen], second]), size, gen)  # [2B, 3, R, R]
        emb = model(views)  # [2B, D]
        loss = contrastive_loss(emb[:batch], emb[batch:], scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


def train_detector(
    shards: str, out_dir: str | os.PathLike[str], config: DetectorTrainConfig | None = None
) -> Path:
    """Train the dedicated detector on the pretraining images of ``shards``; save to ``out_dir``.

    Returns ``out_dir`` (``detector.safetensors`` + ``detector.json`` with the configs, the
    number of training images, the loss curve and the wall time).
    """
    config = config or DetectorTrainConfig()
    started = time.perf_counter()
    images = load_images(shards, config.split, config.max_images)
    model, losses = train_on_images(images, config)
    info = {
        "shards": str(shards),
        "train_images": len(images),
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-10:])),
        "losses": [round(x, 5) for x in losses],
        "seconds": round(time.perf_counter() - started, 2),
    }
    return save_detector(model, out_dir, config, info)


def save_detector(
    model: DuplicateDetector,
    out_dir: str | os.PathLike[str],
    config: DetectorTrainConfig,
    info: dict[str, Any],
) -> Path:
    """Write ``detector.safetensors`` and ``detector.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    meta = {"format": FORMAT, "model": config.model.to_dict(), "train": config.to_dict(), **info}
    (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def load_detector(path: str | os.PathLike[str]) -> DuplicateDetector:
    """Load a detector directory written by :func:`save_detector` (eval mode)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise DetectorError(f"{p}: not a detector directory (needs {META} and {WEIGHTS})")
    try:
        meta = json.loads((p / META).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DetectorError(f"{p / META}: not valid JSON") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DetectorError(f"{p / META}: not a {FORMAT} file")
    try:
        model = DuplicateDetector(DetectorConfig.from_dict(dict(meta["model"])))
        model.load_state_dict(load_file(str(p / WEIGHTS)), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DetectorError(f"{p}: cannot load the detector: {exc}") from exc
    return model.eval()
