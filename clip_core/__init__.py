"""clip_core: the CLIP library (models, tokenizer, preprocessing, loss, checkpoints).

A pure library: it never imports Prefect, DVC or MLflow.
"""

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
