"""Training checkpoints: everything needed to resume mid-epoch, in safetensors + JSON only.

A training checkpoint directory holds::

    model/                  a clip_core checkpoint (weights, model config, tokenizer merges)
    optimizer.safetensors   AdamW moments and step counters, keyed ``state.<param>.<name>``
    train_state.json        progress (step, epoch, batch in epoch, samples seen), optimiser
                            hyper-parameters, grad-scaler state, run identity
    rng-rank<r>.json        each rank's Python, NumPy and torch RNG states

Nothing is pickled; loading validates every file and raises ``TrainCheckpointError`` naming
the file that is missing, corrupt or incompatible with the run.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clip_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clip_core.model import CLIP
from clip_core.tokenizer import ClipTokenizer

MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
STATE_VERSION = 1


class TrainCheckpointError(ValueError):
    """A training checkpoint is missing, corrupt or does not fit this run."""


@dataclass(frozen=True)
class Progress:
    """Where training is: optimiser steps done and the data position."""

    step: int = 0  # optimiser steps completed
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # global batches of this epoch already consumed
    samples_seen: int = 0


def rng_file(rank: int) -> str:
    """Name of a rank's RNG state file."""
    return f"rng-rank{rank}.json"


def capture_rng() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU, and CUDA when present) RNG states as JSON data."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    random.setstate(_tupled(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_train_state(
    directory: str | os.PathLike[str],
    *,
    model: CLIP,
    tokenizer: ClipTokenizer,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    scaler_state: dict[str, Any] | None,
    run: dict[str, Any],
) -> Path:
    """Write rank 0's part of a training checkpoint into ``directory`` (created)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out / MODEL_DIR, tokenizer, metadata={"progress": asdict(progress)})
    tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(tensors, str(out / OPTIMIZER_FILE))
    state = {
        "version": STATE_VERSION,
        "progress": asdict(progress),
        "optimizer": opt_meta,
        "scaler": scaler_state,
        "run": run,
    }
    (out / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return out


def save_rng(directory: str | os.PathLike[str], rank: int) -> None:
    """Write this rank's RNG states into ``directory``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / rng_file(rank)).write_text(json.dumps(capture_rng()))


@dataclass
class LoadedTrainState:
    """A validated training checkpoint, ready to apply."""

    directory: Path
    model: CLIP
    tokenizer: ClipTokenizer
    progress: Progress
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict[str, Any]
    scaler: dict[str, Any] | None
    run: dict[str, Any]

    def apply_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Load the saved moments into ``optimizer`` (built over the same parameters)."""
        state: dict[int, dict[str, Any]] = {}
        for key, tensor in self.optimizer_tensors.items():
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = tensor
        for idx, values in self.optimizer_meta.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(values)
        groups = self.optimizer_meta["param_groups"]
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise TrainCheckpointError(
                f"{self.directory / OPTIMIZER_FILE}: does not fit this run's optimiser: {exc}"
            ) from exc

    def restore_rng(self, rank: int) -> bool:
        """Restore ``rank``'s RNG states if the checkpoint has them; returns whether it did."""
        path = self.directory / rng_file(rank)
        if not path.is_file():
            return False
        try:
            restore_rng(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainCheckpointError(f"{path}: corrupt RNG state: {exc}") from exc
        return True


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainCheckpointError(f"{path}: missing (not a training checkpoint?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainCheckpointError(f"{path}: corrupt JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TrainCheckpointError(f"{path}: expected a JSON object")
    return data


def load_train_state(directory: str | os.PathLike[str]) -> LoadedTrainState:
    """Read and validate a training checkpoint directory written by ``save_train_state``."""
    root = Path(directory)
    if not root.is_dir():
        raise TrainCheckpointError(f"{root}: training checkpoint directory not found")
    meta = _read_json(root / STATE_FILE)
    if meta.get("version") != STATE_VERSION:
        raise TrainCheckpointError(
            f"{root / STATE_FILE}: unsupported version {meta.get('version')!r}"
        )
    try:
        progress = Progress(**meta["progress"])
    except (KeyError, TypeError) as exc:
        raise TrainCheckpointError(f"{root / STATE_FILE}: bad progress record: {exc}") from exc
    try:
        loaded = load_checkpoint(root / MODEL_DIR)
    except (CheckpointError, SafetensorError, ValueError, RuntimeError, KeyError) as exc:
        raise TrainCheckpointError(f"{root / MODEL_DIR}: {exc}") from exc
    if loaded.tokenizer is None:
        raise TrainCheckpointError(f"{root / MODEL_DIR}: has no tokenizer")
    opt_path = root / OPTIMIZER_FILE
    try:
        tensors = load_file(str(opt_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainCheckpointError(f"{opt_path}: unreadable: {exc}") from exc
    return LoadedTrainState(
        directory=root,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        progress=progress,
        optimizer_tensors=tensors,
        optimizer_meta=meta["optimizer"],
        scaler=meta.get("scaler"),
        run=meta.get("run", {}),
    )


def check_compatible(state: LoadedTrainState, model_config: dict[str, Any]) -> None:
    """Raise when the checkpoint's model is not the architecture this run builds."""
    saved = state.model.config.to_dict()
    if saved != model_config:
        diff = sorted(
            f"{k}: {saved.get(k)!r} != {model_config.get(k)!r}"
            for k in set(saved) | set(model_config)
            if saved.get(k) != model_config.get(k)
        )
        raise TrainCheckpointError(
            f"{state.directory / MODEL_DIR}: model does not match this run ({'; '.join(diff)})"
        )
