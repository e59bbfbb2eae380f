"""Capacity-plan numbers for docs/scaling.md, computed from the project's model configs.

Everything runs on PyTorch's meta device (no memory, no GPU): parameter counts, forward FLOPs
per sample (``torch.utils.flop_counter``) and activation memory per sample, counted as the
outputs of every leaf module during one forward pass (what autograd keeps for the backward
pass, to a first approximation) in bf16. With gradient checkpointing (clip_core checkpoints
each transformer block) a block keeps only its input, plus one block's activations during
recomputation.

    .venv/bin/python infra/capacity.py            # a markdown table per model
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clip_core.registry import create_model, get_model_config, parameter_count
from clip_core.transformer import ResidualAttentionBlock

BF16 = 2  # bytes per activation element under bf16 autocast


@dataclass(frozen=True)
class ModelFigures:
    """Per-sample figures of one model config."""

    name: str
    params: int
    embed_dim: int
    forward_gflops: float  # per (image, text) pair
    activation_mb: float  # per pair, no checkpointing
    activation_ckpt_mb: float  # per pair, transformer blocks checkpointed


def _activation_bytes(
    model: nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[int, int]:
    """(bytes without, bytes with block checkpointing) of leaf outputs for one forward."""
    block_of: dict[nn.Module, nn.Module] = {}
    for block in model.modules():
        if isinstance(block, ResidualAttentionBlock):
            for sub in block.modules():
                block_of[sub] = block
    per_block: dict[int, int] = {}
    block_inputs: dict[int, int] = {}
    outside = 0

    def leaf_hook(module: nn.Module, _inp: object, out: object) -> None:
        nonlocal outside
        size = out.numel() * BF16 if isinstance(out, torch.Tensor) else 0
        owner = block_of.get(module)
        if owner is None:
            outside += size
        else:
            per_block[id(owner)] = per_block.get(id(owner), 0) + size

    def block_hook(module: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        block_inputs[id(module)] = inp[0].numel() * BF16

    handles = []
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock):
            handles.append(module.register_forward_pre_hook(block_hook))
        if not list(module.children()):
            handles.append(module.register_forward_hook(leaf_hook))
    try:
        model(images, tokens)
    finally:
        for handle in handles:
            handle.remove()
    full = outside + sum(per_block.values())
    ckpt = outside + sum(block_inputs.values()) + max(per_block.values(), default=0)
    return full, ckpt


def figures(name: str) -> ModelFigures:
    """Parameters, forward GFLOPs and activation MB per pair of model config ``name``."""
    cfg = get_model_config(name)
    with torch.device("meta"):
        model = create_model(cfg)
        size = cfg.vision.image_size
        images = torch.empty(1, 3, size, size)  # [1, 3, H, W]
        tokens = torch.zeros(1, cfg.text.context_length, dtype=torch.long)  # [1, L]
        counter = FlopCounterMode(display=False)
        with counter:
            model(images, tokens)
        full, ckpt = _activation_bytes(model, images, tokens)
    return ModelFigures(
        name=name,
        params=parameter_count(cfg),
        embed_dim=cfg.embed_dim,
        forward_gflops=counter.get_total_flops() / 1e9,
        activation_mb=full / 2**20,
        activation_ckpt_mb=ckpt / 2**20,
    )


def main(names: list[str]) -> None:
    """Print the figures of ``names`` (default: the paper's capacity-plan models) as JSON."""
    for name in names or ["ViT-B-32", "ViT-L-14", "RN50x64", "RN50", "ViT-B-16"]:
        print(json.dumps(asdict(figures(name))))


if __name__ == "__main__":
    main(sys.argv[1:])
