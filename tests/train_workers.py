"""Helpers of the training tests: the multi-process step worker (imported by spawned
processes) and zero-shot accuracy on synthetic rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dist_workers import make_batch, make_model
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from clip_core.model import CLIP
from clip_core.synthetic import class_prompts
from clip_core.tokenizer import ClipTokenizer
from clip_core.transforms import EvalTransform, decode_image
from clip_core.zeroshot import build_classifier, topk_accuracy
from clip_train.config import OptimSection, PrecisionSection
from clip_train.optim import build_optimizer
from clip_train.step import Stepper

MODEL = "tiny-vit"


def make_stepper(
    model: torch.nn.Module, raw: torch.nn.Module, accum: int, sharding: str = "none"
) -> Stepper:
    """A CPU fp32 Stepper with the paper's optimiser over ``raw``."""
    optim = OptimSection(lr=1e-3, warmup_steps=0, accum_steps=accum, grad_clip_norm=1.0)
    opt = build_optimizer(
        raw, optim.lr, optim.weight_decay, (optim.beta1, optim.beta2), optim.eps, sharding=sharding
    )
    return Stepper(
        model,
        raw=raw,  # type: ignore[arg-type]
        optimizer=opt,
        optim=optim,
        precision=PrecisionSection(precision="fp32"),
        device=torch.device("cpu"),
    )


def step_worker(
    rank: int, world: int, init_file: str, out: str, spec: tuple[int, int, int]
) -> None:
    """Train ``steps`` steps on rank's n rows of each global batch; rank 0 saves the
    mean loss per step and the final parameters to ``OUT/dist-accum<accum>.safetensors``;
    ``spec`` is (rows per rank, steps, accumulation steps)."""
    n, steps, accum = spec
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        raw = make_model(MODEL, 0, torch.float32)
        stepper = make_stepper(DDP(raw), raw, accum)
        losses = []
        for step in range(steps):
            images, tokens = make_batch(MODEL, n * world, seed=100 + step, dtype=torch.float32)
            rows = slice(rank * n, (rank + 1) * n)
            result = stepper.step(images[rows], tokens[rows], lr=1e-3)
            loss = torch.tensor([result.loss])
            dist.all_reduce(loss)
            losses.append(loss / world)
        if rank == 0:
            tensors = {f"param.{k}": v.detach().clone() for k, v in raw.state_dict().items()}
            tensors["losses"] = torch.cat(losses)
            save_file(tensors, str(Path(out) / f"dist-accum{accum}.safetensors"))
    finally:
        dist.destroy_process_group()


def zero_worker(rank: int, world: int, init_file: str, out: str, spec: tuple[int, int]) -> None:
    """ZeRO-1 (``sharding="zero1"``) on 2 gloo ranks: ``steps`` steps of n rows per rank,
    then a checkpoint (consolidated on rank 0, written by ``save_train_state``), reloaded into
    a new sharded optimiser, and one more step. Rank 0 saves ``OUT/zero.safetensors``: the
    parameters after ``steps`` steps, after the extra step with the continued optimiser and
    with the reloaded one, and each rank's count of parameters with local AdamW state."""
    from clip_train.optim import gather_optimizer_state
    from clip_train.state import Progress, load_train_state, save_train_state

    n, steps = spec
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        raw = make_model(MODEL, 0, torch.float32)
        assert isinstance(raw, CLIP)
        stepper = make_stepper(DDP(raw), raw, 1, sharding="zero1")

        def step(s: Stepper, i: int) -> None:
            images, tokens = make_batch(MODEL, n * world, seed=100 + i, dtype=torch.float32)
            s.step(images[rank * n : (rank + 1) * n], tokens[rank * n : (rank + 1) * n], 1e-3)

        for i in range(steps):
            step(stepper, i)
        local = torch.tensor([float(len(stepper.optimizer.optim.state))])  # type: ignore[attr-defined]
        counts = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(counts, local)
        tensors = {
            "counts": torch.cat(counts),
            "total": torch.tensor([float(len(list(raw.parameters())))]),
        }
        tensors.update({f"after.{k}": v.detach().clone() for k, v in raw.state_dict().items()})
        gather_optimizer_state(stepper.optimizer)
        ckpt = Path(out) / "zero-ckpt"
        if rank == 0:
            tok = ClipTokenizer.train(
                ["a red square", "a blue circle"], 520, context_length=raw.context_length
            )
            save_train_state(
                ckpt,
                model=raw,
                tokenizer=tok,
                optimizer=stepper.optimizer,
                progress=Progress(steps),
                scaler_state=None,
                run={},
            )
        dist.barrier()
        state = load_train_state(ckpt)
        copy = make_model(MODEL, 0, torch.float32)
        copy.load_state_dict(state.model.state_dict())
        reloaded = make_stepper(DDP(copy), copy, 1, sharding="zero1")
        state.apply_optimizer(reloaded.optimizer)
        step(stepper, steps)
        step(reloaded, steps)
        tensors.update({f"continued.{k}": v.detach().clone() for k, v in raw.state_dict().items()})
        tensors.update({f"reloaded.{k}": v.detach().clone() for k, v in copy.state_dict().items()})
        if rank == 0:
            save_file(tensors, str(Path(out) / "zero.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


SYNTHETIC_TEMPLATES = {
    "colour": ("a {} shape.", "a photo of something {}.", "{} objects."),
    "shape": ("a {}.", "a picture of a {}.", "a {} on a background."),
}


@torch.no_grad()
def zero_shot_synthetic(
    model: CLIP, tokenizer: ClipTokenizer, rows: list[dict[str, Any]], image_size: int
) -> dict[str, dict[str, float]]:
    """Zero-shot top-1 and chance on synthetic rows, per attribute (colour, shape)."""
    model.eval()
    transform = EvalTransform(image_size)
    images = torch.stack([transform(decode_image(r["image"])) for r in rows])  # [N, 3, R, R]
    feats = torch.nn.functional.normalize(model.encode_image(images), dim=-1)  # [N, D]
    results = {}
    for attribute, templates in SYNTHETIC_TEMPLATES.items():
        names = class_prompts(attribute)
        weights = build_classifier(model.encode_text, tokenizer, names, templates)  # [C, D]
        logits = feats @ weights.T  # [N, C]
        labels = torch.tensor([names.index(r["extra"][attribute]) for r in rows])  # [N]
        results[attribute] = {"top1": topk_accuracy(logits, labels, 1), "chance": 1 / len(names)}
    return results
