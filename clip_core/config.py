"""Model configuration: frozen dataclasses loaded from small JSON files.

A config file holds one ``ModelConfig``; unknown keys anywhere are errors, so a typo in a
config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu")


class ConfigError(ValueError):
    """A model configuration is malformed: unknown key, missing key or invalid value."""


@dataclass(frozen=True)
class ViTConfig:
    """Vision transformer tower (ViT-B/32 style)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    type: str = "vit"

    def __post_init__(self) -> None:
        _positive(self, "image_size", "patch_size", "width", "layers", "heads")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size {self.image_size} is not divisible by "
                f"patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ConfigError(f"vision.width {self.width} not divisible by heads {self.heads}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ResNetConfig:
    """Modified ResNet tower: 3-conv stem, anti-aliased downsampling, attention pooling."""

    image_size: int
    width: int
    layers: tuple[int, int, int, int]
    heads: int
    type: str = "resnet"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        _positive(self, "image_size", "width", "heads")
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ConfigError(f"vision.layers must be four positive ints, got {self.layers}")
        if self.image_size % 32:
            raise ConfigError(f"resnet image_size {self.image_size} must be a multiple of 32")
        if (self.width * 32) % self.heads:
            raise ConfigError(f"attention-pool width {self.width * 32} not divisible by heads")


@dataclass(frozen=True)
class TextConfig:
    """Causal text transformer; the feature is taken at the EOS token (the highest token id)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _positive(self, "context_length", "vocab_size", "width", "heads", "layers")
        if self.width % self.heads:
            raise ConfigError(f"text.width {self.width} not divisible by heads {self.heads}")


VisionConfig = ViTConfig | ResNetConfig
VISION_CONFIGS: dict[str, type[ViTConfig] | type[ResNetConfig]] = {
    "vit": ViTConfig,
    "resnet": ResNetConfig,
}


@dataclass(frozen=True)
class ModelConfig:
    """A complete CLIP model: image tower, text tower and the shared embedding space."""

    name: str
    embed_dim: int
    vision: VisionConfig
    text: TextConfig = field(default_factory=TextConfig)
    activation: str = "quick_gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        _positive(self, "embed_dim")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} not one of {ACTIVATIONS}")
        if not 0 < math.exp(self.init_logit_scale) <= self.max_logit_scale:
            raise ConfigError("init_logit_scale must give a scale in (0, max_logit_scale]")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, readable back with ``ModelConfig.from_dict``."""
        data = dataclasses.asdict(self)
        if isinstance(self.vision, ResNetConfig):
            data["vision"]["layers"] = list(self.vision.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict; unknown or missing keys raise ``ConfigError``."""
        data = dict(data)
        vision = dict(_require(data, "vision", "model"))
        kind = vision.get("type", "vit")
        if kind not in VISION_CONFIGS:
            raise ConfigError(f"vision.type {kind!r} not one of {sorted(VISION_CONFIGS)}")
        data["vision"] = _build(VISION_CONFIGS[kind], vision, "vision")
        data["text"] = _build(TextConfig, dict(data.get("text", {})), "text")
        return _build(cls, data, "model")

    def replace(self, **overrides: Any) -> ModelConfig:
        """``dataclasses.replace`` with nested dict overrides: ``replace(text={"layers": 2})``."""
        _check_keys(type(self), overrides, "model")
        for part in ("vision", "text"):
            value = overrides.get(part)
            if isinstance(value, dict):
                current = getattr(self, part)
                _check_keys(type(current), value, part)
                overrides[part] = dataclasses.replace(current, **value)
        return dataclasses.replace(self, **overrides)


def load_config_file(path: str | os.PathLike[str]) -> ModelConfig:
    """Read one JSON model config file; the model name defaults to the file stem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be an object")
    data.setdefault("name", path.stem)
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    _check_keys(cls, data, where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required keys {missing}")
    return cls(**data)


def reject_unknown_keys(
    cls: type[Any], data: Mapping[str, Any], what: str, error: type[Exception] = ValueError
) -> None:
    """Raise ``error("unknown WHAT(s) [...]; allowed [...]")`` when ``data`` has keys that are
    not fields of the dataclass ``cls`` (the ``from_dict`` check of option dataclasses)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"unknown {what}(s) {unknown}; allowed {sorted(names)}")


def _check_keys(cls: type[Any], data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")


def _require(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}: missing required key {key!r}")
    return data[key]


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
