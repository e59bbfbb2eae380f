"""Named model configs: one JSON file each under ``model_configs/``, looked up by name."""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import cache
from pathlib import Path
from typing import Any

import torch

from clip_core.config import ConfigError, ModelConfig, load_config_file
from clip_core.model import CLIP, count_parameters

CONFIG_DIR = Path(__file__).parent / "model_configs"


class UnknownModelError(KeyError):
    """No model config has that name."""

    def __str__(self) -> str:
        return str(self.args[0])


@cache
def _builtin_configs() -> dict[str, ModelConfig]:
    return {p.stem: load_config_file(p) for p in sorted(CONFIG_DIR.glob("*.json"))}


def list_models() -> list[str]:
    """Names of the built-in model configs, sorted."""
    return sorted(_builtin_configs())


def get_model_config(name_or_path: str | os.PathLike[str]) -> ModelConfig:
    """A built-in config by name, or a JSON config file by path."""
    configs = _builtin_configs()
    key = os.fspath(name_or_path)
    if key in configs:
        return configs[key]
    if key.endswith(".json") and Path(key).is_file():
        return load_config_file(key)
    raise UnknownModelError(
        f"unknown model {key!r}; known models: {', '.join(list_models())} "
        "(or pass a path to a .json config)"
    )


def create_model(
    name: str | os.PathLike[str] | ModelConfig,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> CLIP:
    """Build a freshly initialised CLIP from a config name, path or object plus overrides.

    Overrides replace top-level fields; ``vision`` and ``text`` take dicts of nested fields,
    e.g. ``create_model("tiny-vit", text={"vocab_size": 1000})``. Unknown keys raise.
    """
    cfg = name if isinstance(name, ModelConfig) else get_model_config(name)
    if overrides:
        try:
            cfg = cfg.replace(**overrides)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc
    with torch.device(device) if device is not None else nullcontext():
        return CLIP(cfg)


def parameter_count(cfg: ModelConfig) -> int:
    """Parameter count of a config, computed on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return count_parameters(CLIP(cfg))
