"""Load weights trained at one resolution into a model at another (ViT-L/14 -> @336px).

Only the vision positional embedding depends on the resolution (ViT: grid of patches plus
the class token; ResNet: the attention-pool grid plus the mean token). It is resized by
bicubic interpolation over the 2-D grid; every other tensor must match exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clip_core.model import CLIP

POS_KEYS = ("visual.positional_embedding", "visual.attnpool.positional_embedding")


def resize_grid_embedding(pos: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[1 + g*g, W] -> [1 + h*h, W]: keep the first (class/mean) token, interpolate the grid."""
    if pos.shape[0] == new_tokens:
        return pos
    old, new = math.isqrt(pos.shape[0] - 1), math.isqrt(new_tokens - 1)
    if old * old != pos.shape[0] - 1 or new * new != new_tokens - 1:
        raise ValueError(f"positional embedding {tuple(pos.shape)} is not 1 + a square grid")
    grid = pos[1:].T.reshape(1, pos.shape[1], old, old).float()  # [1, W, g, g]
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.reshape(pos.shape[1], new * new).T.to(pos.dtype)  # [h*h, W]
    return torch.cat([pos[:1], grid], dim=0)  # [1 + h*h, W]


def load_resized(model: CLIP, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``model``, resizing positional embeddings; returns resized keys."""
    target = model.state_dict()
    resized = []
    state = dict(state)
    for key in POS_KEYS:
        if key in state and key in target and state[key].shape != target[key].shape:
            state[key] = resize_grid_embedding(state[key], target[key].shape[0])
            resized.append(key)
    model.load_state_dict(state, strict=True)
    return resized
