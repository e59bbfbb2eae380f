"""Load OpenAI's released CLIP checkpoints, inferring the config from the state dict alone."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch

from clip_core.config import ModelConfig, ResNetConfig, TextConfig, ViTConfig
from clip_core.model import CLIP

# Attributes OpenAI's TorchScript archives carry next to the weights.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointFormatError(ValueError):
    """A file or state dict is not a CLIP checkpoint we can read."""


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct indices matched by ``pattern``'s single capture group."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.fullmatch(k))})


def _vision_config(state: dict[str, torch.Tensor]) -> ViTConfig | ResNetConfig:
    if "visual.proj" in state:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return ViTConfig(
            image_size=patch * grid,
            patch_size=patch,
            width=width,
            layers=_count(state, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
            heads=width // 64,
        )
    if "visual.attnpool.c_proj.weight" in state:
        layers = tuple(_count(state, rf"visual\.layer{b}\.(\d+)\..*") for b in (1, 2, 3, 4))
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        return ResNetConfig(
            image_size=grid * 32,
            width=width,
            layers=(layers[0], layers[1], layers[2], layers[3]),
            heads=width * 32 // 64,
        )
    raise CheckpointFormatError(
        "state dict has neither 'visual.proj' (ViT) nor 'visual.attnpool.c_proj.weight' (ResNet)"
    )


def infer_config(state: dict[str, torch.Tensor], name: str = "openai") -> ModelConfig:
    """Recover the ``ModelConfig`` of an OpenAI-format state dict from shapes and key counts.

    Head counts are not stored in the weights; as in every OpenAI release they are taken as
    width // 64 (text, ViT) and 32 * width // 64 (ResNet attention pool).
    """
    required = [
        "text_projection",
        "positional_embedding",
        "token_embedding.weight",
        "ln_final.weight",
    ]
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointFormatError(f"not a CLIP state dict: missing keys {missing}")
    width = state["ln_final.weight"].shape[0]
    text = TextConfig(
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        width=width,
        heads=width // 64,
        layers=_count(state, r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
    )
    return ModelConfig(
        name=name,
        embed_dim=state["text_projection"].shape[1],
        vision=_vision_config(state),
        text=text,
        activation="quick_gelu",
    )


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: OpenAI TorchScript archive, plain state dict or safetensors.

    Never unpickles arbitrary objects: plain files go through ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointFormatError(f"{path}: not a readable safetensors file: {exc}") from exc
    if _is_torchscript_archive(path):
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as exc:
            raise CheckpointFormatError(
                f"{path}: not a loadable TorchScript archive: {exc}"
            ) from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointFormatError(
            f"{path}: cannot read as a weights-only checkpoint: {exc}"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFormatError(f"{path}: does not hold a state dict of tensors")
    return obj


def load_openai_checkpoint(
    source: str | os.PathLike[str] | dict[str, torch.Tensor], name: str = "openai"
) -> CLIP:
    """Build a float32 CLIP from an OpenAI checkpoint (path or state dict); no config needed.

    Float32 tensors of a passed-in state dict are used in place (not copied): the model
    shares their storage.
    """
    state = dict(source) if isinstance(source, dict) else read_state_dict(source)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for key in _NON_PARAMETER_KEYS:
        state.pop(key, None)
    cfg = infer_config(state, name=name)
    with torch.device("meta"):
        model = CLIP(cfg)
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    absent = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    if unexpected or absent:
        raise CheckpointFormatError(
            f"state dict does not match inferred config {cfg.name}: "
            f"unexpected {unexpected[:5]}, missing {absent[:5]}"
        )
    bad = [k for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise CheckpointFormatError(f"shape mismatch for {bad[:5]}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    for key in set(expected) - set(state):  # BatchNorm counters some exports drop
        state[key] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
