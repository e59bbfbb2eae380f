"""Helpers for the registry and serving tests (no tests here).

- :func:`colour_checkpoint`: a tiny CLIP whose zero-shot answer on a solid-colour image is
  known: random towers, projections fitted (a few seconds) so that an image of colour ``c``
  matches the prompt ``"a {c} picture."``. Its colour accuracy is checked when it is made.
- :func:`random_checkpoint`: a tiny random CLIP (fast).
- :func:`log_training_run`: an MLflow run with the layout of ``clip_train.run.train`` (same
  tracking helpers: experiment per model family, flattened params, lineage tags, step
  metrics, artifact ``checkpoint/``), without Ray.
- :func:`write_eval_dir`: an evaluation output (``clip_eval.report.write_report``) for chosen
  zero-shot / linear-probe accuracies.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_core import create_model
from clip_core.checkpoint import save_checkpoint
from clip_core.model import CLIP
from clip_core.synthetic import COLOURS
from clip_core.tokenizer import ClipTokenizer
from clip_core.transforms import EvalTransform
from clip_core.zeroshot import build_classifier

COLOUR_NAMES = list(COLOURS)
COLOUR_TEMPLATE = "a {} picture."
IMAGE_SIZE = 32


def colour_png(colour: str, seed: int) -> bytes:
    """A noisy solid-colour PNG (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.array(COLOURS[colour], dtype=float)[None, None, :]
    noisy = np.clip(pixels + rng.normal(0, 20, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tiny(tok: ClipTokenizer) -> CLIP:
    return create_model(
        "tiny-vit",
        text={"vocab_size": tok.vocab_size, "layers": 1, "context_length": 16},
        vision={"image_size": IMAGE_SIZE, "layers": 1, "patch_size": 8},
    )


def _tokenizer() -> ClipTokenizer:
    prompts = [COLOUR_TEMPLATE.format(c) for c in COLOUR_NAMES]
    return ClipTokenizer.train(prompts * 4 + ["a red square.", "a photo of a dog."], 600, 16)


def random_checkpoint(directory: Path, seed: int = 0, progress: bool = True) -> Path:
    """A tiny random CLIP with its tokenizer, saved as a clip_core checkpoint.

    With ``progress`` its metadata says 12 steps and 768 samples seen (as clip_train's do).
    """
    torch.manual_seed(seed)
    tok = _tokenizer()
    meta = {"progress": {"step": 12, "epoch": 1, "samples_seen": 768}} if progress else {}
    return save_checkpoint(_tiny(tok), directory, tok, metadata=meta)


def _fit_projections(model: CLIP, tok: ClipTokenizer, steps: int = 200, lr: float = 2.0) -> None:
    """Fit the two projections so colour images match their colour prompt (towers frozen)."""
    transform = EvalTransform(IMAGE_SIZE)
    train = [(c, s) for c in range(len(COLOUR_NAMES)) for s in range(5)]
    with torch.no_grad():
        pixels = [
            transform(Image.open(io.BytesIO(colour_png(COLOUR_NAMES[c], 1000 + s))))
            for c, s in train
        ]
        image_feats = model.image_features(torch.stack(pixels))  # [N, W]
        tokens = tok([COLOUR_TEMPLATE.format(c) for c in COLOUR_NAMES])  # [C, L]
        x = model.token_embedding(tokens) + model.positional_embedding[: tokens.shape[1]]
        x = model.ln_final(model.transformer(x, causal=True))  # [C, L, W]
        text_feats = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)]  # [C, W]
    labels = torch.tensor([c for c, _ in train])  # [N]
    proj = model.visual.proj
    assert isinstance(proj, torch.nn.Parameter)
    params = [proj, model.text_projection]
    for _ in range(steps):  # plain gradient descent (torch.optim imports torch._dynamo: ~8 s)
        img = F.normalize(image_feats @ proj, dim=-1)  # [N, D]
        txt = F.normalize(text_feats @ model.text_projection, dim=-1)  # [C, D]
        loss = F.cross_entropy(20 * img @ txt.T, labels)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)


def colour_accuracy(model: CLIP, tok: ClipTokenizer, seeds: range) -> float:
    """Zero-shot colour accuracy on fresh noisy colour images (in-process, clip_core only)."""
    transform = EvalTransform(IMAGE_SIZE)
    with torch.no_grad():
        weights = build_classifier(model.encode_text, tok, COLOUR_NAMES, [COLOUR_TEMPLATE])
        hits = 0
        for i, colour in enumerate(COLOUR_NAMES):
            for s in seeds:
                img = transform(Image.open(io.BytesIO(colour_png(colour, s))))[None]
                logits = F.normalize(model.encode_image(img), dim=-1) @ weights.T  # [1, C]
                hits += int(logits.argmax().item() == i)
    return hits / (len(COLOUR_NAMES) * len(seeds))


def colour_checkpoint(directory: Path) -> Path:
    """A tiny CLIP that knows colours (see the module doc); asserts it does."""
    torch.manual_seed(0)
    tok = _tokenizer()
    model = _tiny(tok)
    _fit_projections(model, tok)
    model.eval()
    accuracy = colour_accuracy(model, tok, range(2))
    assert accuracy == 1.0, f"the colour model should know every colour, got {accuracy:.2f}"
    meta = {"progress": {"step": 150, "epoch": 1, "samples_seen": 7500}}
    return save_checkpoint(model, directory, tok, metadata=meta)


def log_training_run(
    uri: str,
    checkpoint: Path,
    run_name: str,
    *,
    model: str = "tiny-vit",
    dataset_version: str = "md5-abc123",
    status: str = "FINISHED",
) -> str:
    """A finished MLflow run laid out like clip_train's; returns its run id."""
    from clip_train.config import load_run_config
    from clip_train.tracking import StepLogger, experiment_name, finish_run, open_run

    cfg = load_run_config("tiny", [f"infra.run_name={run_name}"])
    tags = {
        "clipops.model": model,
        "clipops.dataset_version": dataset_version,
        "clipops.data": "/data/shards",
        "mlflow.source.git.commit": "0123456789abcdef",
        "clipops.seed": "0",
    }
    target = open_run(uri, experiment_name(model, None), run_name, cfg.flat_params(), tags)
    logger = StepLogger(target, system_metrics=False)
    for step in range(1, 4):
        logger.log({"train/loss": 3.0 / step, "train/samples_seen": 64.0 * step}, step)
    logger.close()
    finish_run(target, status, {"checkpoint": checkpoint})
    return target.run_id


#: Test images per zero-shot record: its first ``round(top1 * N)`` are the correct ones, so a
#: higher top-1 on the same dataset is a superset of correct examples (a clear paired gain).
EXAMPLES = 1000


def _record(dataset: str, task: str, top1: float) -> dict[str, Any]:
    metrics: dict[str, Any] = {"top1": top1}
    extra: dict[str, Any] = {}
    if task == "zero_shot":
        metrics.update(
            chance=0.1,
            ensembling={"bare_top1": top1, "single_top1": top1, "ensemble_top1": top1},
        )
        k = round(top1 * EXAMPLES)
        extra["per_example"] = {
            "ids": [f"{dataset}-{i:04d}" for i in range(EXAMPLES)],
            "top1_correct": [1] * k + [0] * (EXAMPLES - k),
        }
    else:
        metrics.update(C=1.0, train_examples=100)
    return {
        "suite": "test",
        "dataset": dataset,
        "dataset_options": {},
        "model": "tiny",
        "checkpoint_sha256": "0" * 64,
        "task": task,
        "options": {},
        "metrics": metrics,
        "classnames": ["a", "b"],
        "templates": [],
        "timing": {"seconds": 0.5},
        **extra,
    }


def write_eval_dir(directory: Path, top1: Mapping[tuple[str, str], float]) -> Path:
    """``clipops eval``-style output for ``{(dataset, task): top1}``; returns the directory."""
    from clip_eval.report import write_report

    records = [_record(ds, task, acc) for (ds, task), acc in top1.items()]
    write_report(records, directory)
    (directory / "feature_cache").mkdir(exist_ok=True)  # as clipops eval leaves it
    (directory / "feature_cache" / "x.npz").write_bytes(b"not linked")
    return directory
