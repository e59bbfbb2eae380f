"""Which torch device the served model runs on: ``$CLIPOPS_SERVE_DEVICE`` (default cpu)."""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "CLIPOPS_SERVE_DEVICE"


def serving_device() -> str:
    """``$CLIPOPS_SERVE_DEVICE`` (e.g. ``cuda``, ``cuda:1``), default ``cpu``; checked here."""
    name = os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"${DEVICE_ENV}={name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"${DEVICE_ENV}={name!r} but CUDA is not available here")
    return name
