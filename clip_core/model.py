"""The CLIP model: an image tower, a causal text tower and a learned temperature.

Parameter names and shapes are exactly those of OpenAI's released checkpoints: the text
tower lives at the top level (``token_embedding``, ``transformer``, ``ln_final``,
``text_projection``) and the image tower under ``visual``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clip_core.config import ModelConfig, ResNetConfig, ViTConfig
from clip_core.resnet import ModifiedResNet
from clip_core.transformer import Transformer
from clip_core.vit import VisionTransformer


class ClipOutput(NamedTuple):
    """What ``CLIP.forward`` returns."""

    image_features: torch.Tensor  # [B, D], L2-normalised
    text_features: torch.Tensor  # [B, D], L2-normalised
    logit_scale: torch.Tensor  # [], exp of the learned log temperature


def build_visual(cfg: ModelConfig) -> VisionTransformer | ModifiedResNet:
    """The image tower for a config, chosen by its ``vision.type``."""
    if isinstance(cfg.vision, ViTConfig):
        return VisionTransformer(cfg.vision, cfg.embed_dim, cfg.activation)
    if isinstance(cfg.vision, ResNetConfig):
        return ModifiedResNet(cfg.vision, cfg.embed_dim)
    raise TypeError(f"unsupported vision config {type(cfg.vision).__name__}")


class CLIP(nn.Module):
    """Contrastive language-image model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.context_length = t.context_length
        self.visual = build_visual(cfg)
        # _weight skips nn.Embedding's own init; init_parameters does OpenAI's.
        self.token_embedding = nn.Embedding(
            t.vocab_size, t.width, _weight=torch.empty(t.vocab_size, t.width)
        )
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.activation)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        if self.text_projection.device.type != "meta":
            self.init_parameters()

    def init_parameters(self) -> None:
        """OpenAI's initialisation for every tower."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)
        with torch.no_grad():
            self.logit_scale.fill_(self.config.init_logit_scale)
        self.transformer.init_parameters()
        self.visual.init_parameters()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward to save memory: each transformer block of both
        towers, or each bottleneck block of a ResNet image tower."""
        self.transformer.grad_checkpointing = enabled
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enabled
        else:
            self.visual.grad_checkpointing = enabled

    def set_channels_last(self, enabled: bool = True) -> None:
        """NHWC memory layout for a ResNet image tower (same results; faster convolutions).

        Raises ``ValueError`` for a ViT tower, whose only convolution is the patch embedding.
        """
        if not isinstance(self.visual, ModifiedResNet):
            raise ValueError("channels_last applies to ResNet image towers, not ViT")
        self.visual.set_channels_last(enabled)

    @property
    def image_size(self) -> int:
        """Input resolution of the image tower."""
        return self.config.vision.image_size

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] -> unnormalised image embeddings [B, D]."""
        return self.visual(images)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] -> features before the projection [B, W] (linear probes)."""
        return self.visual.features(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (EOS = highest id in each row) -> unnormalised embeddings [B, D]."""
        L = tokens.shape[1]
        if self.context_length < L:
            raise ValueError(f"token length {L} exceeds context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # [B, L, W]
        x = self.transformer(x, causal=True)  # [B, L, W]
        x = self.ln_final(x)
        eos = tokens.argmax(dim=-1)  # [B]
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]  # [B, W]
        return pooled @ self.text_projection  # [B, D]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> ClipOutput:
        """Normalised image and text embeddings and the logit scale."""
        image = F.normalize(self.encode_image(images), dim=-1)  # [B, D]
        text = F.normalize(self.encode_text(tokens), dim=-1)  # [B, D]
        return ClipOutput(image, text, self.logit_scale.exp())

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the stored log temperature to [0, ln(max scale)]; call after each step."""
        self.logit_scale.clamp_(0.0, math.log(self.config.max_logit_scale))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
