"""Vision transformer image tower (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336)."""

from __future__ import annotations

import torch
from torch import nn

from clip_core.config import ViTConfig
from clip_core.transformer import Transformer


class VisionTransformer(nn.Module):
    """Patchify conv, class token, ln_pre, transformer, ln_post on the class token, projection."""

    def __init__(self, cfg: ViTConfig, output_dim: int, activation: str) -> None:
        super().__init__()
        width = cfg.width
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid_size**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def init_parameters(self) -> None:
        """OpenAI's initialisation."""
        scale = self.transformer.width**-0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        self.transformer.init_parameters()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] -> pooled features before the projection [B, width]."""
        x = self.conv1(x)  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, g*g+1, W]
        x = self.ln_pre(x)
        x = self.transformer(x)  # [B, g*g+1, W]
        return self.ln_post(x[:, 0])  # [B, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] -> projected features [B, D]."""
        return self.features(x) @ self.proj  # [B, D]
