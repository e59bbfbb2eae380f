"""clip_core: the CLIP library (models, tokenizer, preprocessing, loss, checkpoints).

A pure library: it never imports Prefect, DVC or MLflow.

The names below are loaded on first use (PEP 562), so importing a torch-free submodule such as
:mod:`clip_core.images` (what the ingest checks and their worker processes use) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clip_core.config import ConfigError, ModelConfig, ResNetConfig, TextConfig, ViTConfig
    from clip_core.loss import ClipLoss, contrastive_loss, local_rows_loss
    from clip_core.model import CLIP, ClipOutput, count_parameters
    from clip_core.openai import infer_config, load_openai_checkpoint
    from clip_core.registry import (
        UnknownModelError,
        create_model,
        get_model_config,
        list_models,
        parameter_count,
    )

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "CLIP": "clip_core.model",
    "ClipLoss": "clip_core.loss",
    "ClipOutput": "clip_core.model",
    "ConfigError": "clip_core.config",
    "ModelConfig": "clip_core.config",
    "ResNetConfig": "clip_core.config",
    "TextConfig": "clip_core.config",
    "UnknownModelError": "clip_core.registry",
    "ViTConfig": "clip_core.config",
    "contrastive_loss": "clip_core.loss",
    "count_parameters": "clip_core.model",
    "create_model": "clip_core.registry",
    "get_model_config": "clip_core.registry",
    "infer_config": "clip_core.openai",
    "list_models": "clip_core.registry",
    "load_openai_checkpoint": "clip_core.openai",
    "local_rows_loss": "clip_core.loss",
    "parameter_count": "clip_core.registry",
}

__all__ = [
    "CLIP",
    "ClipLoss",
    "ClipOutput",
    "ConfigError",
    "ModelConfig",
    "ResNetConfig",
    "TextConfig",
    "UnknownModelError",
    "ViTConfig",
    "contrastive_loss",
    "count_parameters",
    "create_model",
    "get_model_config",
    "infer_config",
    "list_models",
    "load_openai_checkpoint",
    "local_rows_loss",
    "parameter_count",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clip_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """Module attributes, the lazily loaded names included."""
    return sorted({*globals(), *_EXPORTS})
