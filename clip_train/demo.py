"""The demo job, the main job as far as the platform exists today.

ingest the synthetic corpus into validated Parquet shards (clip_data) -> validate them with
Great Expectations -> pretrain a tiny CLIP on CPU from the shards -> checkpoint, reload ->
zero-shot accuracy on the held-out test split. Later stages (Ray Train, overlap analysis,
evaluation suite, MLflow registration, Prefect flows) replace its in-process pieces.
"""

from __future__ import annotations

import json
import platform
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_core import create_model, get_model_config
from clip_core.checkpoint import load_checkpoint, save_checkpoint
from clip_core.model import CLIP
from clip_core.synthetic import class_prompts
from clip_core.tokenizer import ClipTokenizer
from clip_core.transforms import EvalTransform, TrainTransform, decode_image
from clip_core.zeroshot import build_classifier, mean_per_class_recall, topk_accuracy
from clip_data.ingest import IngestConfig, ingest
from clip_data.shards import iter_rows, read_manifest
from clip_data.validate import validate_dataset
from clip_train.optim import build_optimizer, cosine_lr, set_lr

ZERO_SHOT_TEMPLATES = {
    "colour": ("a {} shape.", "a photo of something {}.", "{} objects."),
    "shape": ("a {}.", "a picture of a {}.", "a {} on a background."),
}


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo run depends on; logged with its results."""

    model: str = "tiny-vit"
    train_samples: int = 2048
    test_samples: int = 512
    image_size: int = 64
    vocab_size: int = 2048
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 20
    seed: int = 0
    threads: int = 2


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def code_version() -> str:
    """The git commit of the working tree (with '-dirty' if modified), or 'unknown'."""
    here = Path(__file__).parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _train(
    model: CLIP,
    images: list[Any],
    tokens: torch.Tensor,
    cfg: DemoConfig,
    log: Callable[[str], None],
) -> list[float]:
    transform = TrainTransform(cfg.image_size)
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(images) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    losses: list[float] = []
    model.train()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(images), generator=g)
        idx = order[(step % steps_per_epoch) * cfg.batch_size :][: cfg.batch_size]
        batch = torch.stack([transform(images[i], generator=g) for i in idx.tolist()])
        set_lr(opt, cosine_lr(step, cfg.lr, cfg.warmup_steps, total))
        out = model(batch, tokens[idx])  # [B, D] x2
        logits = out.logit_scale * out.image_features @ out.text_features.T  # [B, B]
        labels = torch.arange(len(idx))
        loss = (
            torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.T, labels)
        ) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_logit_scale()
        losses.append(loss.item())
        if step % steps_per_epoch == steps_per_epoch - 1:
            log(f"epoch {step // steps_per_epoch + 1}/{cfg.epochs} loss {loss.item():.3f}")
    return losses


@torch.no_grad()
def zero_shot_synthetic(
    model: CLIP, tokenizer: ClipTokenizer, rows: list[dict[str, Any]], image_size: int
) -> dict[str, dict[str, float]]:
    """Zero-shot top-1 and mean per-class recall on synthetic rows, per attribute."""
    model.eval()
    transform = EvalTransform(image_size)
    images = torch.stack([transform(decode_image(r["image"])) for r in rows])  # [N, 3, R, R]
    feats = torch.nn.functional.normalize(model.encode_image(images), dim=-1)  # [N, D]
    results = {}
    for attribute, templates in ZERO_SHOT_TEMPLATES.items():
        names = class_prompts(attribute)
        weights = build_classifier(model.encode_text, tokenizer, names, templates)  # [C, D]
        logits = feats @ weights.T  # [N, C]
        labels = torch.tensor([names.index(r["extra"][attribute]) for r in rows])  # [N]
        results[attribute] = {
            "top1": topk_accuracy(logits, labels, 1),
            "mean_per_class_recall": mean_per_class_recall(logits, labels),
            "chance": 1 / len(names),
        }
    return results


def _prepare_data(dest: Path, cfg: DemoConfig, log: Callable[[str], None]) -> tuple[Path, str]:
    """Ingest + validate the synthetic corpus; returns the shard dir and its DVC md5."""
    source = (
        f"synthetic:train={cfg.train_samples},test={cfg.test_samples},"
        f"seed={cfg.seed},image_size={cfg.image_size}"
    )
    manifest = ingest(source, dest, IngestConfig(workers=1), progress=False)
    counts = manifest["counts"]
    log(
        f"ingested {counts['read']} pairs: {counts['accepted']} accepted, "
        f"{counts['duplicates']} duplicates, {counts['quarantined']} quarantined"
    )
    report = validate_dataset(dest)
    if not report.success:
        raise RuntimeError(f"validation of {dest} failed:\n{report.summary()}")
    version = str(read_manifest(dest)["dataset_version"]["dvc_md5"])
    log(f"validated {report.rows} rows with Great Expectations; dataset version {version}")
    return dest, version


def run_demo(
    out_dir: str | Path, cfg: DemoConfig = DemoConfig(), log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the demo end to end; writes ``checkpoint/`` and ``report.json`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    started = time.time()
    shards, data_version = _prepare_data(out / "shards", cfg, log)
    rows = list(iter_rows(shards))
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    captions = [r["caption"] for r in train]
    context = get_model_config(cfg.model).text.context_length
    tokenizer = ClipTokenizer.train(captions, cfg.vocab_size, context_length=context)
    log(f"trained BPE tokenizer: {tokenizer.vocab_size} tokens")
    model = create_model(
        cfg.model, text={"vocab_size": tokenizer.vocab_size}, vision={"image_size": cfg.image_size}
    )
    images = [decode_image(r["image"]) for r in train]
    losses = _train(model, images, tokenizer(captions), cfg, log)
    ckpt = save_checkpoint(
        model,
        out / "checkpoint",
        tokenizer,
        metadata={"demo_config": asdict(cfg), "dataset_version": data_version},
    )
    loaded = load_checkpoint(ckpt)
    assert loaded.tokenizer is not None
    metrics = zero_shot_synthetic(loaded.model, loaded.tokenizer, test, cfg.image_size)
    report = {
        "config": asdict(cfg),
        "code_version": code_version(),
        "dataset_version": data_version,
        "rows": {"train": len(train), "test": len(test)},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "checkpoint": str(ckpt),
        "weights_sha256": loaded.weights_sha256,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "zero_shot": metrics,
        "seconds": round(time.time() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for attribute, m in metrics.items():
        log(f"zero-shot {attribute}: top-1 {m['top1']:.3f} (chance {m['chance']:.3f})")
    return report
