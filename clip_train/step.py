"""One optimiser step of distributed contrastive training.

The loss is the paper's sharded local-rows loss: each worker scores its own pairs against the
gathered global batch, and DDP averages gradients, so the update equals single-process
training on the global batch. With ``accum_steps`` > 1 the update is still exact: features
of every micro-batch are first computed without gradients, then each micro-batch is
recomputed with gradients and its cached features swapped in, so the loss is always the
loss of the full local batch against the full global batch (negatives are not lost). The
temperature's gradient is taken from the last micro-batch only (the one DDP synchronises),
so it counts once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clip_core.loss import local_rows_loss
from clip_core.model import CLIP, ClipOutput
from clip_core.transforms import normalize_pixels
from clip_train.config import OptimSection, PrecisionSection
from clip_train.optim import set_lr

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(
    precision: PrecisionSection, device: torch.device, allow_cpu: bool = False
) -> torch.dtype | None:
    """The autocast dtype: bf16/fp16 on GPU; None (fp32) on CPU unless ``allow_cpu``."""
    if device.type != "cuda" and not allow_cpu:
        return None
    return AUTOCAST_DTYPES.get(precision.precision)


@dataclass(frozen=True)
class StepResult:
    """What one optimiser step reports, as 0-d tensors on the step's device.

    Reading a value (``loss``, ``logit_scale``, ``grad_norm``) copies it to the host, which
    waits for the GPU to finish the step: the training loop reads them only on the steps it
    logs (``tracking.log_every``), so the GPU runs ahead in between.
    """

    loss_tensor: torch.Tensor
    logit_scale_tensor: torch.Tensor
    grad_norm_tensor: torch.Tensor | None

    @property
    def loss(self) -> float:
        """The step's loss (host copy: a device sync)."""
        return float(self.loss_tensor)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) after the step (host copy: a device sync)."""
        return float(self.logit_scale_tensor)

    @property
    def grad_norm(self) -> float | None:
        """The gradient norm before clipping, when clipping is on (host copy)."""
        return None if self.grad_norm_tensor is None else float(self.grad_norm_tensor)


class Stepper:
    """Applies optimiser steps to a (possibly DDP-wrapped) CLIP."""

    def __init__(
        self,
        model: nn.Module,
        *,
        raw: CLIP,
        optimizer: torch.optim.Optimizer,
        optim: OptimSection,
        precision: PrecisionSection,
        device: torch.device,
        allow_cpu_autocast: bool = False,
    ) -> None:
        """``allow_cpu_autocast`` runs the GPU mixed-precision path (bf16 autocast, or fp16
        autocast with a gradient scaler) on CPU too: slower there, used to test that path."""
        self.model, self.raw, self.optimizer = model, raw, optimizer
        self.optim = optim
        self.device = device
        self.dtype = autocast_dtype(precision, device, allow_cpu_autocast)
        use_scaler = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _forward(self, images: torch.Tensor, tokens: torch.Tensor) -> ClipOutput:
        with self._autocast():
            out: ClipOutput = self.model(images, tokens)
        return out

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def _micro_losses(self, images: torch.Tensor, tokens: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield each micro-batch's loss (already backpropagated) for the full local batch."""
        chunks = self.optim.accum_steps
        if chunks == 1:
            out = self._forward(images, tokens)
            loss = local_rows_loss(out.image_features, out.text_features, out.logit_scale)
            self.scaler.scale(loss).backward()
            yield loss
            return
        img_chunks, tok_chunks = images.chunk(chunks), tokens.chunk(chunks)
        with torch.no_grad():
            cached = [self._forward(i, t) for i, t in zip(img_chunks, tok_chunks, strict=True)]
        for j, (img, tok) in enumerate(zip(img_chunks, tok_chunks, strict=True)):
            with self._no_sync(last=j == chunks - 1):
                out = self._forward(img, tok)
                all_img = torch.cat(
                    [
                        out.image_features if k == j else c.image_features
                        for k, c in enumerate(cached)
                    ]
                )  # [n, D]
                all_txt = torch.cat(
                    [out.text_features if k == j else c.text_features for k, c in enumerate(cached)]
                )  # [n, D]
                last = j == chunks - 1
                scale = out.logit_scale if last else out.logit_scale.detach()
                loss = local_rows_loss(all_img, all_txt, scale)
                self.scaler.scale(loss).backward()
            yield loss

    def step(self, images: torch.Tensor, tokens: torch.Tensor, lr: float) -> StepResult:
        """One update from this worker's batch: images [n, 3, R, R], tokens [n, L].

        ``images`` are normalised float pixels, or uint8 RGB pixels as the input pipeline
        ships them, normalised here on the step's device (OpenAI mean/std).
        """
        if images.dtype == torch.uint8:
            images = normalize_pixels(images)  # [n, 3, R, R] float32
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for loss in self._micro_losses(images, tokens):  # noqa: B007 - the last one is reported
            pass
        grad_norm = None
        if self.optim.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.raw.parameters(), self.optim.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.raw.clamp_logit_scale()
        scale = self.raw.logit_scale.detach().exp()
        return StepResult(loss.detach(), scale, grad_norm)


def compile_model(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile(model, backend=backend)``: same parameters, same results, fused kernels.

    ``inductor`` generates kernels (needs a C++ compiler on CPU; compiling the first step takes
    minutes on a small CPU); ``aot_eager`` traces forward and backward graphs without codegen.
    """
    compiled: nn.Module = torch.compile(model, backend=backend)  # type: ignore[assignment]
    return compiled
