"""Checkpoints: safetensors + JSON, exact round trip, never unpickled, tampering detected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_core import CLIP, create_model
from clip_core.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from clip_core.tokenizer import ClipTokenizer

CAPTIONS = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square")] * 5
CAPTIONS += [f"{p} corner" for p in ("top left", "bottom right")]


def _inputs(model: CLIP, tokenizer: ClipTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = model.image_size
    images = torch.randn(3, 3, size, size, generator=g)
    return images, tokenizer(CAPTIONS[:3])


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, name: str) -> None:
    tokenizer = ClipTokenizer.train(CAPTIONS, vocab_size=600, context_length=32, min_frequency=1)
    torch.manual_seed(1)
    model = create_model(name, text={"vocab_size": tokenizer.vocab_size, "context_length": 32})
    model.eval()
    images, tokens = _inputs(model, tokenizer)
    expected = model(images, tokens)

    path = save_checkpoint(model, tmp_path / "ckpt", tokenizer, metadata={"step": 7})
    assert sorted(p.name for p in path.iterdir()) == ["bpe_merges.txt.gz", META_FILE, WEIGHTS_FILE]
    loaded = load_checkpoint(path)
    assert loaded.metadata == {"step": 7}
    assert loaded.model.config == model.config
    assert loaded.tokenizer is not None
    assert torch.equal(loaded.tokenizer(CAPTIONS[:3]), tokens)
    got = loaded.model(images, tokens)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format_version"] == 1
    assert meta["tokenizer"]["merges_sha256"] == tokenizer.reference()["merges_sha256"]


def test_weights_file_is_safetensors_not_pickle(tmp_path: Path) -> None:
    path = save_checkpoint(create_model("tiny-vit"), tmp_path / "c")
    raw = (path / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "logit_scale" in header and "visual.proj" in header
    assert b"\x80\x02" not in raw[:2] and not raw.startswith(b"PK")  # neither pickle nor zip


def test_tampered_weights_are_rejected(tmp_path: Path) -> None:
    path = save_checkpoint(create_model("tiny-vit"), tmp_path / "c")
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_missing_files_and_bad_version(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(create_model("tiny-rn"), tmp_path / "c")
    meta = json.loads((path / META_FILE).read_text())
    meta["format_version"] = 99
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)


def test_save_replaces_atomically_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    model = create_model("tiny-vit")
    save_checkpoint(model, tmp_path / "c")
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    save_checkpoint(model, tmp_path / "c")
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert load_checkpoint(tmp_path / "c").model.logit_scale.item() == 1.5
