"""The training input pipeline's contract: uint8 pixels out, normalised in the step."""

from __future__ import annotations

import io

import numpy as np
import torch
from dist_workers import make_batch, make_model
from PIL import Image
from train_workers import MODEL, make_stepper

from clip_core.transforms import OPENAI_MEAN, OPENAI_STD, TrainTransform, decode_image
from clip_train.data import preprocess_rows


def _rows(n: int, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size + 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "PNG")
        images.append(buf.getvalue())
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "image": np.array(images, dtype=object),
        "caption": np.array([f"a photo of thing {i}" for i in range(n)], dtype=object),
    }


def test_preprocess_rows_ships_uint8_pixels_of_the_train_transform() -> None:
    merges = (("a", "b"), ("t", "h"))
    batch = _rows(3, 40)
    out = preprocess_rows(
        batch, merges=merges, context_length=16, image_size=32, scale=(0.5, 1.0), seed=1
    )
    images = out["image"]
    assert images.dtype == np.uint8 and images.shape == (3, 3, 32, 32)
    assert out["tokens"].shape == (3, 16) and out["tokens"].dtype == np.int64
    # every row is a crop of its own image: full-range noise, not a constant or a float copy
    assert all(len(np.unique(im)) > 100 for im in images)
    t = TrainTransform(32, scale=(0.5, 1.0))
    sides = {t.crop(decode_image(bytes(b))).size for b in batch["image"]}
    assert sides == {(32, 32)}


def test_the_step_normalises_uint8_pixels_like_the_float_transform() -> None:
    """Same model, same batch: uint8 pixels in == normalised floats in (loss and weights)."""
    shaped, tokens = make_batch(MODEL, 4, seed=0, dtype=torch.float32)  # [4, 3, R, R], [4, L]
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.integers(0, 256, tuple(shaped.shape), dtype=np.uint8))
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)  # [3, 1, 1]
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)  # [3, 1, 1]
    floats = (pixels.float() / 255.0 - mean) / std  # [4, 3, R, R]
    results = []
    for images in (pixels, floats):
        raw = make_model(MODEL, 0, torch.float32)
        result = make_stepper(raw, raw, accum=1).step(images, tokens, lr=1e-3)
        results.append((result.loss, [p.detach().clone() for p in raw.parameters()]))
    (loss_u8, params_u8), (loss_f, params_f) = results
    assert loss_u8 == loss_f
    assert all(torch.equal(a, b) for a, b in zip(params_u8, params_f, strict=True))
