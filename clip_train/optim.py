"""The paper's optimiser: AdamW with decoupled weight decay except on gains, biases and the
temperature, and a cosine learning-rate schedule with linear warmup."""

from __future__ import annotations

import math

import torch
from torch import nn

from clip_train.config import ADAMW_IMPLEMENTATIONS


def is_decay_exempt(name: str, param: torch.Tensor) -> bool:
    """Gains (norm weights), biases, embeddings' scalars and the temperature get no decay."""
    return param.ndim < 2 or name.endswith(".bias") or name == "logit_scale"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two AdamW groups: decayed matrices and non-decayed gains/biases/temperature."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_decay_exempt(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    *,
    implementation: str = "foreach",
) -> torch.optim.AdamW:
    """AdamW over ``param_groups``.

    ``implementation``: "foreach" (default: one multi-tensor kernel per operation),
    "fused" (one fused kernel per parameter group; CPU and CUDA), or "for-loop" (a
    Python loop over parameters, the reference). All three compute the same update.
    """
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(
            f"AdamW implementation {implementation!r} not one of {ADAMW_IMPLEMENTATIONS}"
        )
    return torch.optim.AdamW(
        param_groups(model, weight_decay),
        lr=lr,
        betas=betas,
        eps=eps,
        foreach=implementation == "foreach",
        fused=implementation == "fused",
    )


def cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then cosine decay to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
