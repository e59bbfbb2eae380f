"""Typed run configuration for pretraining, split by concern.

A run config is a YAML file with one section per concern (``model``, ``data``, ``optim``,
``precision``, ``checkpoint``, ``infra``, ``tracking``) plus ``seed``. Each section loads into
a frozen dataclass; unknown keys anywhere are errors. Named recipes live in
``clip_train/recipes/<name>.yaml``; a path to any YAML file works the same way. Overrides are
dotted ``section.key=value`` pairs applied before validation.

Batch sizes are global, as in the paper: the per-worker batch is derived from the worker count
and gradient-accumulation steps (``global = per_worker * workers * accum_steps``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from clip_core.yamlio import load_yaml

RECIPE_DIR = Path(__file__).parent / "recipes"
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "cudagraphs")  # torch.compile backends offered
ADAMW_IMPLEMENTATIONS = ("foreach", "fused", "for-loop")  # torch.optim.AdamW code paths
# How optimiser state is laid out over the data-parallel workers: "none" (every rank holds
# all of AdamW's moments) or "zero1" (each rank holds the moments of its share of the
# parameters, ZeRO stage 1: torch's ZeroRedundancyOptimizer; same update).
OPTIMIZER_SHARDING = ("none", "zero1")


class RunConfigError(ValueError):
    """A run configuration is malformed: unknown key, missing key or invalid value."""


@dataclass(frozen=True)
class ModelSection:
    """Which CLIP to build and its tokenizer."""

    name: str
    image_size: int | None = None  # override the config's resolution (e.g. 64 for tiny runs)
    vision: dict[str, Any] = field(default_factory=dict)  # nested overrides of the model config
    text: dict[str, Any] = field(default_factory=dict)
    tokenizer_merges: str | None = None  # BPE merges file; None = train one on the captions
    tokenizer_vocab_size: int = 49408
    tokenizer_sample: int = 200_000  # captions read to train a tokenizer
    init_from: str | None = None  # clip_core checkpoint dir to start from (fine-tuning)


@dataclass(frozen=True)
class DataSection:
    """Where the shards are and how batches are formed."""

    shards: str = ""  # ingest output directory (local or s3://)
    split: str = "train"
    global_batch_size: int = 256
    shuffle_seed: int = 0
    shuffle_buffer: int = 1024  # per-worker local shuffle buffer (rows)
    preprocess_cpus: float = 0.5  # CPUs reserved per Ray Data preprocessing task
    preprocess_batch: int = 64
    train_scale: tuple[float, float] = (0.9, 1.0)


@dataclass(frozen=True)
class OptimSection:
    """The paper's optimiser and schedule."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 2000
    epochs: int = 32
    max_steps: int | None = None  # stop after this many optimiser steps (None = epochs)
    grad_clip_norm: float | None = None
    accum_steps: int = 1
    adamw: str = "foreach"  # foreach | fused | for-loop: same update (bench/speed.py)
    sharding: str = "none"  # none | zero1: optimiser state split over the workers


@dataclass(frozen=True)
class PrecisionSection:
    """Numerics and memory options."""

    precision: str = "bf16"  # on CPU always fp32
    grad_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend when compile is true
    channels_last: bool = False  # ResNet image towers: NHWC convolutions (bench/speed.py)


@dataclass(frozen=True)
class CheckpointSection:
    """How often to checkpoint and how many to keep."""

    every_steps: int = 1000
    keep: int = 3


@dataclass(frozen=True)
class InfraSection:
    """Where and how wide the run is."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    ray_address: str | None = None  # None: start a local cluster on demand
    local_cpus: int | None = None  # logical CPUs of that local cluster (None: detected)
    storage_path: str = "runs"  # local dir or s3:// URI; relative paths are made absolute
    run_name: str = "clipops"
    max_failures: int = 2
    torch_threads: int = 1  # intra-op threads per worker on CPU
    # Pin every worker to one GPU type (Ray's accelerator_type: "A100", "V100", "H100", ...):
    # synchronous data parallelism runs at the pace of the slowest GPU. None: any GPU.
    accelerator_type: str | None = None


@dataclass(frozen=True)
class TrackingSection:
    """MLflow tracking; ``uri`` None means $MLFLOW_TRACKING_URI or a local SQLite file."""

    uri: str | None = None
    experiment: str | None = None  # None: one experiment per model family
    log_every: int = 10
    system_metrics: bool = True
    # The driver prints a progress line (step/total, epoch, loss, pairs/s, ETA) every
    # ``progress_every`` steps and at least every ``progress_seconds`` seconds.
    progress_every: int = 20
    progress_seconds: float = 30.0


@dataclass(frozen=True)
class RunConfig:
    """A full pretraining run."""

    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    infra: InfraSection = field(default_factory=InfraSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    seed: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def per_worker_batch(self) -> int:
        """Rows per worker per micro-step."""
        return self.data.global_batch_size // (self.infra.num_workers * self.optim.accum_steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (round-trips through ``from_dict``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from a nested dict; unknown or missing keys raise ``RunConfigError``."""
        data = dict(data)
        _check_keys(cls, data, "run")
        if "model" not in data:
            raise RunConfigError("run config: missing section 'model'")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            section_cls = _SECTIONS.get(f.name)
            value = data[f.name]
            kwargs[f.name] = _build(section_cls, value, f.name) if section_cls else value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise RunConfigError(f"run config: {exc}") from exc

    def flat_params(self) -> dict[str, str]:
        """Stable ``section.key`` -> string view, for experiment trackers."""
        out: dict[str, str] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for key, value in sorted(values.items()):
                    out[f"{section}.{key}"] = str(value)
            else:
                out[section] = str(values)
        return out


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "precision": PrecisionSection,
    "checkpoint": CheckpointSection,
    "infra": InfraSection,
    "tracking": TrackingSection,
}

T = TypeVar("T")


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _build(cls: type[T], value: Any, where: str) -> T:
    if not isinstance(value, Mapping):
        raise RunConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    _check_keys(cls, value, where)
    value = dict(value)
    if "train_scale" in value:
        value["train_scale"] = tuple(value["train_scale"])
    try:
        return cls(**value)
    except TypeError as exc:
        raise RunConfigError(f"{where}: {exc}") from exc


def _validate(cfg: RunConfig) -> None:
    infra, optim, data = cfg.infra, cfg.optim, cfg.data
    if infra.num_workers < 1 or optim.accum_steps < 1:
        raise RunConfigError("infra.num_workers and optim.accum_steps must be >= 1")
    denom = infra.num_workers * optim.accum_steps
    if data.global_batch_size % denom or data.global_batch_size < denom:
        raise RunConfigError(
            f"data.global_batch_size {data.global_batch_size} is not divisible by "
            f"num_workers x accum_steps = {denom}"
        )
    if cfg.precision.precision not in PRECISIONS:
        raise RunConfigError(f"precision.precision must be one of {PRECISIONS}")
    _validate_accelerator(infra, cfg.precision.precision)
    if cfg.precision.compile_backend not in COMPILE_BACKENDS:
        raise RunConfigError(f"precision.compile_backend must be one of {COMPILE_BACKENDS}")
    if optim.adamw not in ADAMW_IMPLEMENTATIONS:
        raise RunConfigError(f"optim.adamw must be one of {ADAMW_IMPLEMENTATIONS}")
    if optim.sharding not in OPTIMIZER_SHARDING:
        raise RunConfigError(f"optim.sharding must be one of {OPTIMIZER_SHARDING}")
    for name in ("every_steps", "keep"):
        if getattr(cfg.checkpoint, name) < 1:
            raise RunConfigError(f"checkpoint.{name} must be >= 1")
    if optim.epochs < 1 or (optim.max_steps is not None and optim.max_steps < 1):
        raise RunConfigError("optim.epochs and optim.max_steps must be >= 1")
    if optim.warmup_steps < 0 or optim.lr <= 0:
        raise RunConfigError("optim.lr must be > 0 and optim.warmup_steps >= 0")
    t = cfg.tracking
    if t.log_every < 1 or t.progress_every < 1 or t.progress_seconds <= 0:
        raise RunConfigError(
            "tracking.log_every and tracking.progress_every must be >= 1, "
            "tracking.progress_seconds > 0"
        )


# GPU types (Ray accelerator_type names) without bf16 tensor cores: they train in fp16.
NO_BF16_GPUS = frozenset({"V100", "P100", "T4", "K80", "P4"})


def _validate_accelerator(infra: InfraSection, precision: str) -> None:
    kind = infra.accelerator_type
    if kind is None:
        return
    if not infra.use_gpu:
        raise RunConfigError(f"infra.accelerator_type={kind} needs infra.use_gpu=true")
    if kind in NO_BF16_GPUS and precision == "bf16":
        raise RunConfigError(
            f"{kind} GPUs have no bf16 tensor cores: set precision.precision=fp16 "
            "(loss scaling) or pin another infra.accelerator_type"
        )


def list_recipes() -> list[str]:
    """Names of the bundled recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _parse_value(text: str) -> Any:
    return load_yaml(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        path, eq, raw = item.partition("=")
        if not eq:
            raise RunConfigError(f"override {item!r}: expected section.key=value")
        section, dot, key = path.strip().partition(".")
        value = _parse_value(raw)
        if not dot:
            out[section] = value
            continue
        current = out.setdefault(section, {})
        if not isinstance(current, dict):
            raise RunConfigError(f"override {item!r}: {section} is not a section")
        current[key] = value
    return out


def load_run_config(name_or_path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """A recipe by name (``tiny``, ``vit-b32``...) or a YAML path, with dotted overrides."""
    path = Path(name_or_path)
    if not path.suffix and (RECIPE_DIR / f"{name_or_path}.yaml").is_file():
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RunConfigError(
            f"no run config {name_or_path!r}: not a file and not a recipe ({list_recipes()})"
        )
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RunConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RunConfigError(f"{path}: top level must be a mapping")
    try:
        return RunConfig.from_dict(apply_overrides(data, overrides))
    except RunConfigError as exc:
        raise RunConfigError(f"{path}: {exc}") from exc
