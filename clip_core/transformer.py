"""Pre-LN transformer blocks with parameter names of OpenAI's released CLIP weights.

Attention keeps ``nn.MultiheadAttention``'s parameter layout (``in_proj_weight``,
``in_proj_bias``, ``out_proj``) so released checkpoints load unchanged, but runs batch-first
through PyTorch's fused ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's released CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the activation elementwise."""
        return x * torch.sigmoid(1.702 * x)


ACTIVATION_LAYERS: dict[str, type[nn.Module]] = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class SelfAttention(nn.Module):
    """Multi-head self-attention on [B, L, D] inputs using fused SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Attend over the sequence; ``causal`` masks future positions (text tower)."""
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        qkv = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, L, D/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, D/H]
        y = y.transpose(1, 2).reshape(B, L, D)  # [B, L, D]
        return self.out_proj(y)


class Mlp(nn.Module):
    """Two-layer MLP: c_fc -> activation -> c_proj."""

    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = ACTIVATION_LAYERS[activation]()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., width] -> [..., width]."""
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, hidden, activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]."""
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks, with optional gradient checkpointing."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str
    ) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]."""
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    def init_parameters(self) -> None:
        """OpenAI's initialisation: std scaled by width and depth."""
        proj_std = (self.width**-0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            assert isinstance(block, ResidualAttentionBlock)
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
