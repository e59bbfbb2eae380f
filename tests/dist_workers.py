"""Worker bodies for multi-process tests (imported by spawned processes)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from clip_core import create_model, local_rows_loss
from clip_core.checkpoint import save_checkpoint
from clip_core.model import CLIP
from clip_train.config import OptimSection, PrecisionSection
from clip_train.optim import build_optimizer
from clip_train.step import Stepper

STEP_LR = 1e-3


def make_batch(
    model_name: str, n: int, seed: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic global batch of images [n, 3, R, R] and tokens [n, L]."""
    g = torch.Generator().manual_seed(seed)
    model = create_model(model_name)
    r, L, v = model.image_size, model.context_length, model.config.text.vocab_size
    images = torch.randn(n, 3, r, r, generator=g, dtype=dtype)
    tokens = torch.randint(1, v - 2, (n, L), generator=g)
    lengths = torch.randint(2, L, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        tokens[i, length] = v - 1  # EOS = highest id
        tokens[i, length + 1 :] = 0
    return images, tokens


def make_model(model_name: str, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """The same initialised model on every rank; BatchNorm frozen (per-rank stats differ)."""
    torch.manual_seed(seed)
    model = create_model(model_name).to(dtype)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def loss_worker(
    rank: int, world: int, init_file: str, out: str, specs: list[dict[str, str]]
) -> None:
    """For each spec, compute the sharded loss on this rank's rows under DDP.

    Rank 0 writes ``OUT/<id>.safetensors`` holding "loss" (mean over ranks) and
    "grad.<name>" (DDP-averaged gradients) for each spec.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for spec in specs:
            tensors = _one_spec(rank, world, spec)
            if rank == 0:
                save_file(tensors, str(Path(out) / f"{spec['id']}.safetensors"))
    finally:
        dist.destroy_process_group()


def _one_spec(rank: int, world: int, spec: dict[str, str]) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, spec["dtype"])
    name, n, seed = spec["model"], int(spec["n"]), int(spec["seed"])
    images, tokens = make_batch(name, n, seed, dtype)
    per = n // world
    model = DDP(make_model(name, seed, dtype))
    out = model(images[rank * per : (rank + 1) * per], tokens[rank * per : (rank + 1) * per])
    loss = local_rows_loss(out.image_features, out.text_features, out.logit_scale)
    loss.backward()  # DDP averages gradients over ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    tensors = {
        f"grad.{k}": p.grad.contiguous()
        for k, p in model.module.named_parameters()
        if p.grad is not None
    }
    tensors["loss"] = mean_loss
    return tensors


def fast_stepper(model: nn.Module, raw: CLIP, adamw: str) -> Stepper:
    """A CPU fp32 ``Stepper`` (local-rows loss, clip 1.0) with the given AdamW implementation."""
    optim = OptimSection(lr=STEP_LR, warmup_steps=0, grad_clip_norm=1.0, adamw=adamw)
    betas = (optim.beta1, optim.beta2)
    opt = build_optimizer(
        raw, optim.lr, optim.weight_decay, betas, optim.eps, implementation=optim.adamw
    )
    return Stepper(
        model,
        raw=raw,
        optimizer=opt,
        optim=optim,
        precision=PrecisionSection(precision="fp32"),
        device=torch.device("cpu"),
    )


def optimised_step_worker(
    rank: int, world: int, init_file: str, out: str, specs: list[dict[str, str]]
) -> None:
    """For each spec, train ``steps`` steps of ``n`` rows per rank with the CPU optimisations
    on: DDP, the local-rows loss, fused attention (the library's default), AdamW
    ``adamw`` (for-loop | foreach | fused) and, when ``channels_last`` is "1", the ResNet
    tower in NHWC layout. Global batch of step s: ``make_batch(model, n * world, 100 + s)``.

    Rank 0 writes ``OUT/<id>.safetensors`` ("losses": mean over ranks per step,
    "param.<name>": the final weights, "features.image"/"features.text": the trained model's
    eval-mode features of the step-0 batch) and a checkpoint ``OUT/<id>-ckpt``.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for spec in specs:
            raw, tensors = _optimised_run(rank, world, spec)
            if rank == 0:
                save_file(tensors, str(Path(out) / f"{spec['id']}.safetensors"))
                save_checkpoint(raw, Path(out) / f"{spec['id']}-ckpt")
    finally:
        dist.destroy_process_group()


def _optimised_run(
    rank: int, world: int, spec: dict[str, str]
) -> tuple[CLIP, dict[str, torch.Tensor]]:
    name, n, steps = spec["model"], int(spec["n"]), int(spec["steps"])
    raw = make_model(name, 0, torch.float32)
    assert isinstance(raw, CLIP)
    if spec["channels_last"] == "1":
        raw.set_channels_last(True)
    stepper = fast_stepper(DDP(raw), raw, spec["adamw"])
    losses = []
    rows = slice(rank * n, (rank + 1) * n)
    for step in range(steps):
        images, tokens = make_batch(name, n * world, seed=100 + step, dtype=torch.float32)
        loss = torch.tensor([stepper.step(images[rows], tokens[rows], lr=STEP_LR).loss])
        dist.all_reduce(loss)
        losses.append(loss / world)
    tensors = {f"param.{k}": v.detach().contiguous() for k, v in raw.state_dict().items()}
    tensors["losses"] = torch.cat(losses)  # [steps]
    images, tokens = make_batch(name, n * world, seed=100, dtype=torch.float32)
    raw.eval()
    with torch.no_grad():
        out = raw(images, tokens)
    tensors["features.image"] = out.image_features  # [n * world, D]
    tensors["features.text"] = out.text_features
    return raw, tensors
