"""Symmetric contrastive (InfoNCE) loss, single-process or sharded as in the paper.

With W workers each holding n pairs, worker r computes only its own n rows of the
image->text and text->image logits against the gathered global batch of N = W*n: memory
O(n x N) instead of O(N^2). The per-worker loss is the mean over its rows, so the mean over
workers (what DDP's gradient averaging optimises) equals the loss on the global batch, in
value and in gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_core.distributed import all_gather_with_grad, rank_and_world


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Reference full-matrix loss on one batch of normalised features [N, D] (no sharding)."""
    logits = logit_scale * image_features @ text_features.T  # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)  # [N]
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def local_rows_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: Any = None,
) -> torch.Tensor:
    """The paper's sharded loss for this rank's n pairs [n, D] against the global batch.

    Without an initialised process group it reduces to ``contrastive_loss``.
    """
    rank, world = rank_and_world(group)
    if world == 1:
        return contrastive_loss(image_features, text_features, logit_scale)
    all_images = all_gather_with_grad(image_features, group)  # [N, D]
    all_texts = all_gather_with_grad(text_features, group)  # [N, D]
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + rank * n  # [n]
    logits_i2t = logit_scale * image_features @ all_texts.T  # [n, N]
    logits_t2i = logit_scale * text_features @ all_images.T  # [n, N]
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


class ClipLoss(nn.Module):
    """Module wrapper around ``local_rows_loss`` for training loops."""

    def __init__(self, group: Any = None) -> None:
        super().__init__()
        self.group = group

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Loss of normalised features [n, D] and the scale []."""
        return local_rows_loss(image_features, text_features, logit_scale, self.group)
