"""Modified ResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64).

Differences from torchvision's ResNet, as in the CLIP paper: a 3-conv stem with an average
pool, anti-aliased downsampling (all convs stride 1; strided blocks average-pool after conv2
and in the shortcut), and attention pooling in place of global average pooling.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_core.config import ResNetConfig


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avgpool) -> 1x1 bottleneck with expansion 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool: nn.Module = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, out, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, 4*planes, H/stride, W/stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.relu3(y + identity)


class AttentionPool2d(nn.Module):
    """One multi-head attention layer whose query is the mean of the spatial features."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(spatial_dim**2 + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        if self.positional_embedding.device.type != "meta":
            self.init_parameters()

    def init_parameters(self) -> None:
        """OpenAI's initialisation: std = width^-0.5 for the embedding and projections."""
        std = self.c_proj.in_features**-0.5
        for weight in (self.positional_embedding, self.q_proj.weight, self.k_proj.weight):
            nn.init.normal_(weight, std=std)
        nn.init.normal_(self.v_proj.weight, std=std)
        nn.init.normal_(self.c_proj.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, output_dim]."""
        return self.c_proj(self.pool(x))  # [B, output_dim]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Attention-pooled features before the output projection: [B, C, H, W] -> [B, C]."""
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, HW+1, C]
        x = x + self.positional_embedding.to(x.dtype)
        hd = C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, hd).transpose(1, 2)  # [B, H, 1, hd]
        k = self.k_proj(x).view(B, -1, self.heads, hd).transpose(1, 2)  # [B, H, HW+1, hd]
        v = self.v_proj(x).view(B, -1, self.heads, hd).transpose(1, 2)  # [B, H, HW+1, hd]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, hd]
        return y.transpose(1, 2).reshape(B, C)  # [B, C]


@contextlib.contextmanager
def _bn_stats_restored(module: nn.Module) -> Iterator[None]:
    """Run the body, then put every BatchNorm's running statistics back as they were."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, its value before)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            stats = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
            saved += [(buf, buf.clone()) for buf in stats if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, before in saved:
                buf.copy_(before)


def _recompute_keeps_bn_stats(
    block: nn.Module,
) -> Callable[
    [], tuple[contextlib.AbstractContextManager[Any], contextlib.AbstractContextManager[Any]]
]:
    """``checkpoint``'s ``context_fn``: the forward as usual; the recomputation in backward
    leaves BatchNorm running statistics alone (a block's BN must count each batch once, as
    it does without checkpointing; the recomputed batch statistics, and so the gradients,
    are the same)."""
    return lambda: (contextlib.nullcontext(), _bn_stats_restored(block))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image encoder."""

    def __init__(self, cfg: ResNetConfig, output_dim: int) -> None:
        super().__init__()
        w = cfg.width
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = w
        self.layer1 = self._make_layer(w, cfg.layers[0])
        self.layer2 = self._make_layer(w * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(w * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(w * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, w * 32, cfg.heads, output_dim)
        self.channels_last = False
        self.grad_checkpointing = False  # recompute each bottleneck in backward

    def set_channels_last(self, enabled: bool = True) -> None:
        """Keep conv weights and activations in NHWC (channels-last) memory layout.

        Same parameters and results (up to float rounding); the convolutions run the NHWC
        kernels (oneDNN on CPU, tensor cores on GPU). Checkpoints are saved contiguous, so the
        flag does not change what is written.
        """
        self.channels_last = enabled
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.to(memory_format=fmt)  # type: ignore[call-overload]  # stubs lack memory_format

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_parameters(self) -> None:
        """OpenAI's initialisation: scaled attention-pool projections, zero last BN gain."""
        self.attnpool.init_parameters()
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                assert isinstance(block, Bottleneck)
                nn.init.zeros_(block.bn3.weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] -> [B, width, R/4, R/4]."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] -> spatial features [B, 32*width, R/32, R/32]."""
        x = x.to(self.conv1.weight.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(
                        block, x, use_reentrant=False, context_fn=_recompute_keeps_bn_stats(block)
                    )
                else:
                    x = block(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the final projection (for linear probes): [B, 32*width]."""
        return self.attnpool.pool(self.trunk(x))  # [B, 32*width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] -> projected features [B, D] (attention pooling)."""
        return self.attnpool(self.trunk(x))  # [B, D]
