"""Training checkpoints: exact round trip, no pickles, clear errors naming the file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_core import create_model
from clip_core.model import CLIP
from clip_core.tokenizer import ClipTokenizer
from clip_train.optim import build_optimizer
from clip_train.state import (
    Progress,
    TrainCheckpointError,
    check_compatible,
    load_train_state,
    save_rng,
    save_train_state,
)


def _trained(tmp_path: Path) -> tuple[Path, CLIP, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = create_model("tiny-vit", vision={"image_size": 32})
    opt = build_optimizer(model, 1e-3, 0.2)
    images = torch.randn(4, 3, 32, 32)
    tokens = torch.randint(1, 100, (4, model.context_length))
    for _ in range(2):
        out = model(images, tokens)
        loss = (out.image_features @ out.text_features.T).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok = ClipTokenizer.train(["a red square", "a blue circle"] * 10, 600, context_length=24)
    ckpt = save_train_state(
        tmp_path / "ckpt",
        model=model,
        tokenizer=tok,
        optimizer=opt,
        progress=Progress(step=2, epoch=0, batch_in_epoch=2, samples_seen=8),
        scaler_state=None,
        run={"world_size": 1},
    )
    return ckpt, model, opt


def test_round_trip_restores_model_optimizer_and_progress(tmp_path: Path) -> None:
    """Weights, AdamW moments/steps and progress come back exactly."""
    ckpt, model, opt = _trained(tmp_path)
    state = load_train_state(ckpt)
    assert state.progress == Progress(2, 0, 2, 8)
    for k, v in model.state_dict().items():
        assert torch.equal(state.model.state_dict()[k], v), k
    fresh = build_optimizer(state.model, 1e-3, 0.2)
    state.apply_optimizer(fresh)
    want, got = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert want.keys() == got.keys()
    for idx in want:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(want[idx][name], got[idx][name]), (idx, name)
    check_compatible(state, model.config.to_dict())


def test_rng_states_round_trip(tmp_path: Path) -> None:
    """After restore, Python, NumPy and torch draw the same numbers as when saved."""
    ckpt, _, _ = _trained(tmp_path)
    save_rng(ckpt, rank=3)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(())  # move all generators on
    assert load_train_state(ckpt).restore_rng(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert not load_train_state(ckpt).restore_rng(7)


def test_checkpoint_has_no_pickles(tmp_path: Path) -> None:
    """Only safetensors, JSON and the gzip'd merges text."""
    ckpt, _, _ = _trained(tmp_path)
    suffixes = {"".join(p.suffixes) for p in ckpt.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".txt.gz"}, suffixes


@pytest.mark.parametrize(
    ("victim", "damage"),
    [
        ("train_state.json", b"{not json"),
        ("optimizer.safetensors", b"\x00" * 10),
        ("model/model.safetensors", b"garbage"),
        ("model/clip.json", b"[]"),
    ],
)
def test_corrupt_files_are_named(tmp_path: Path, victim: str, damage: bytes) -> None:
    """Each damaged file gives TrainCheckpointError with a path in the message."""
    ckpt, _, _ = _trained(tmp_path)
    (ckpt / victim).write_bytes(damage)
    with pytest.raises(TrainCheckpointError) as info:
        load_train_state(ckpt)
    assert str(ckpt / victim.split("/", maxsplit=1)[0]) in str(info.value)


def test_incompatible_model_is_refused(tmp_path: Path) -> None:
    """A checkpoint of another architecture fails with the differing fields named."""
    ckpt, _, _ = _trained(tmp_path)
    other = create_model("tiny-vit", vision={"image_size": 64}).config.to_dict()
    with pytest.raises(TrainCheckpointError, match="vision"):
        check_compatible(load_train_state(ckpt), other)
    data = json.loads((ckpt / "train_state.json").read_text())
    data["version"] = 99
    (ckpt / "train_state.json").write_text(json.dumps(data))
    with pytest.raises(TrainCheckpointError, match="unsupported version"):
        load_train_state(ckpt)
