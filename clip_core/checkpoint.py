"""Model checkpoints: safetensors weights plus a JSON file. Nothing is ever unpickled.

Layout of a checkpoint directory::

    model.safetensors   the state dict (float tensors as saved)
    clip.json           {"format_version", "model_config", "tokenizer", "metadata"}
    bpe_merges.txt.gz   the tokenizer's merges, when one was saved with the model
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clip_core.config import ModelConfig
from clip_core.model import CLIP
from clip_core.tokenizer import ClipTokenizer

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "clip.json"
MERGES_FILE = "bpe_merges.txt.gz"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or does not match its own description."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns."""

    model: CLIP
    tokenizer: ClipTokenizer | None
    metadata: dict[str, Any]
    weights_sha256: str


def save_checkpoint(
    model: CLIP,
    directory: str | os.PathLike[str],
    tokenizer: ClipTokenizer | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write model (+ tokenizer) to ``directory`` atomically; returns the directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        tokenizer_ref: dict[str, Any] | None = None
        if tokenizer is not None:
            tokenizer.save(tmp / MERGES_FILE)
            tokenizer_ref = {**tokenizer.reference(), "file": MERGES_FILE}
        meta = {
            "format_version": FORMAT_VERSION,
            "model_config": model.config.to_dict(),
            "tokenizer": tokenizer_ref,
            "weights_sha256": file_sha256(tmp / WEIGHTS_FILE),
            "metadata": metadata or {},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Read a checkpoint written by ``save_checkpoint``; verifies the weights' checksum."""
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory}: missing {path.name}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is not valid JSON") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory}: unsupported format_version {version!r}")
    digest = file_sha256(weights_path)
    if meta.get("weights_sha256") not in (None, digest):
        raise CheckpointError(f"checkpoint {directory}: {WEIGHTS_FILE} checksum mismatch")
    cfg = ModelConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        model = CLIP(cfg)
    state = load_file(str(weights_path), device=str(map_location))
    model.load_state_dict(state, strict=True, assign=True)
    tokenizer = None
    ref = meta.get("tokenizer")
    if ref:
        tokenizer = ClipTokenizer.from_merges_file(
            directory / ref["file"], context_length=ref["context_length"]
        )
    return LoadedCheckpoint(model.eval(), tokenizer, meta.get("metadata", {}), digest)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
