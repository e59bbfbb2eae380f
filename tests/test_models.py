"""Tests for the CLIP model library: configs, registry, towers, attention and parameter layout.

Forward passes use the tiny configs; the paper-sized configs are only ever built on the meta
device (shapes, no memory).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_names import PAPER_MODELS, TINY_MODELS
from torch import nn

from clip_core.config import (
    ConfigError,
    ModelConfig,
    ResNetConfig,
    ViTConfig,
    load_config_file,
)
from clip_core.loss import contrastive_loss
from clip_core.model import CLIP
from clip_core.registry import (
    UnknownModelError,
    create_model,
    get_model_config,
    list_models,
    parameter_count,
)
from clip_core.resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from clip_core.transformer import QuickGELU, ResidualAttentionBlock, SelfAttention
from clip_core.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --------------------------------------------------------------------------- helpers


def randomize_batchnorm(model: CLIP, seed: int = 0) -> None:
    """Random BatchNorm gains and biases, running statistics calibrated on random images.

    OpenAI's init zeroes each bottleneck's last BN gain, which would hide half of the ResNet
    from the tests, and default running statistics (0 mean, unit variance) leave the image
    embedding almost independent of the image; after this every block matters.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch's statistics
        was_training = model.training
        model.train()
        model.encode_image(make_images(model, 16, seed=seed + 100))
        model.train(was_training)
        for m in norms:
            m.momentum = 0.1


def make_model(name: str, seed: int = 0, **overrides: Any) -> CLIP:
    """A randomly initialised tiny model in eval mode (BN randomised for ResNets)."""
    torch.manual_seed(seed)
    model = create_model(name, **overrides)
    randomize_batchnorm(model, seed)
    return model.eval()


def make_images(model: CLIP, batch: int, seed: int = 1) -> torch.Tensor:
    """Random images [B, 3, R, R] at the model's resolution."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, model.image_size, model.image_size, generator=gen)


def make_tokens(
    model: CLIP, eos_positions: list[int], length: int | None = None, seed: int = 2
) -> torch.Tensor:
    """Token rows [B, L]: SOT, random content, EOS (the highest id) at eos_positions[i], zeros."""
    vocab = model.config.text.vocab_size
    length = model.context_length if length is None else length
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(eos_positions), length, dtype=torch.long)
    for row, eos in enumerate(eos_positions):
        tokens[row, 0] = vocab - 2  # SOT
        tokens[row, 1:eos] = torch.randint(1, vocab - 2, (eos - 1,), generator=gen)
        tokens[row, eos] = vocab - 1  # EOS
    return tokens


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, CLIP]:
    """One tiny ViT and one tiny ResNet CLIP, built once (do not mutate)."""
    return {name: make_model(name) for name in TINY_MODELS}


# --------------------------------------------------------------------------- registry / configs


def test_list_models_has_paper_and_tiny_configs() -> None:
    names = list_models()
    for name in [*PAPER_MODELS, *TINY_MODELS]:
        assert name in names
    assert names == sorted(names)


def test_unknown_model_raises_naming_known_models() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model_config("ViT-Z-99")
    message = str(info.value)
    assert "ViT-Z-99" in message
    for name in ("RN50", "ViT-B-32", "ViT-L-14-336", "tiny-vit"):
        assert name in message
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownModelError):
        create_model("no-such-model", device="meta")


@pytest.mark.parametrize(
    "overrides",
    [
        {"bogus": 1},
        {"text": {"bogus": 1}},
        {"vision": {"bogus": 1}},
        {"text": {"layers": 2, "bogus": 1}},
    ],
    ids=["top-level", "text", "vision", "text-mixed"],
)
def test_unknown_override_key_raises(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="bogus"):
        create_model("tiny-vit", device="meta", **overrides)


def test_unknown_override_does_not_touch_registry() -> None:
    before = get_model_config("tiny-vit")
    with pytest.raises(ConfigError):
        create_model("tiny-vit", device="meta", text={"layers": 2, "bogus": 1})
    assert get_model_config("tiny-vit") == before
    assert get_model_config("tiny-vit").text.layers != 2


@pytest.mark.parametrize("where", ["model", "vision", "text"])
def test_config_file_with_unknown_key_raises(tmp_path: Path, where: str) -> None:
    data = get_model_config("tiny-vit").to_dict()
    if where == "model":
        data["temprature"] = 0.07
    else:
        data[where]["temprature"] = 0.07
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError, match="temprature") as info:
        load_config_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="temprature"):
        get_model_config(str(path))  # the registry also takes paths to .json files


def test_config_file_loads_and_name_defaults_to_stem(tmp_path: Path) -> None:
    data = get_model_config("tiny-rn").to_dict()
    del data["name"]
    path = tmp_path / "my-rn.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    cfg = get_model_config(path)
    assert cfg.name == "my-rn"
    assert dataclasses.replace(cfg, name="tiny-rn") == get_model_config("tiny-rn")
    model = create_model(path, device="meta")
    assert model.config == cfg


def test_config_file_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level"):
        load_config_file(path)


@pytest.mark.parametrize(
    ("drop", "key"),
    [
        ((), "embed_dim"),
        ((), "vision"),
        (("vision",), "patch_size"),
        (("vision",), "width"),
        (("vision",), "heads"),
    ],
)
def test_missing_required_key_raises(drop: tuple[str, ...], key: str) -> None:
    data = get_model_config("tiny-vit").to_dict()
    target = data
    for part in drop:
        target = target[part]
    del target[key]
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(data)


def test_missing_required_resnet_key_raises() -> None:
    data = get_model_config("tiny-rn").to_dict()
    del data["vision"]["layers"]
    with pytest.raises(ConfigError, match="layers"):
        ModelConfig.from_dict(data)


def test_text_section_is_optional_with_paper_defaults() -> None:
    data = get_model_config("ViT-B-32").to_dict()
    del data["text"]
    cfg = ModelConfig.from_dict(data)
    assert cfg == get_model_config("ViT-B-32")  # the base text tower: 77 x 49408, 512w, 8h, 12l


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("tiny-vit", {"vision": {"heads": 3}}, "not divisible by heads"),
        ("tiny-vit", {"text": {"heads": 3}}, "not divisible by heads"),
        ("tiny-vit", {"vision": {"patch_size": 7}}, "not divisible by patch_size"),
        ("tiny-vit", {"vision": {"layers": 0}}, "positive int"),
        ("tiny-vit", {"vision": {"width": 128.0}}, "positive int"),
        ("tiny-vit", {"text": {"layers": True}}, "positive int"),
        ("tiny-vit", {"text": {"context_length": -1}}, "positive int"),
        ("tiny-vit", {"embed_dim": 0}, "positive int"),
        ("tiny-vit", {"activation": "relu"}, "activation"),
        ("tiny-vit", {"init_logit_scale": math.log(1000.0)}, "init_logit_scale"),
        ("tiny-rn", {"vision": {"image_size": 100}}, "multiple of 32"),
        ("tiny-rn", {"vision": {"layers": (1, 1, 1)}}, "four positive ints"),
        ("tiny-rn", {"vision": {"layers": (1, 0, 1, 1)}}, "four positive ints"),
        ("tiny-rn", {"vision": {"heads": 7}}, "not divisible by heads"),
    ],
)
def test_invalid_values_raise(name: str, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_model_config(name).replace(**overrides)
    with pytest.raises(ConfigError, match=message):
        create_model(name, device="meta", **overrides)


def test_unknown_vision_type_raises() -> None:
    data = get_model_config("tiny-vit").to_dict()
    data["vision"]["type"] = "convnext"
    with pytest.raises(ConfigError, match="convnext"):
        ModelConfig.from_dict(data)


def test_configs_are_frozen() -> None:
    cfg = get_model_config("tiny-rn")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed_dim = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vision.width = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.text.layers = 1  # type: ignore[misc]
    assert isinstance(cfg.vision.layers, tuple)  # not a mutable list either


def test_overrides_change_the_model() -> None:
    base = create_model("tiny-vit", device="meta")
    layers = base.config.text.layers + 1
    model = create_model("tiny-vit", device="meta", text={"layers": layers}, embed_dim=64)
    assert len(base.transformer.resblocks) == base.config.text.layers
    assert len(model.transformer.resblocks) == layers
    assert model.config.text.layers == layers
    assert model.config.text.width == base.config.text.width  # other text fields kept
    assert model.config.vision == base.config.vision  # vision untouched
    assert isinstance(model.visual, VisionTransformer)
    assert len(model.visual.transformer.resblocks) == base.config.vision.layers
    assert model.text_projection.shape == (base.config.text.width, 64)
    assert model.visual.proj.shape == (base.config.vision.width, 64)
    assert get_model_config("tiny-vit") == base.config  # the registry's config is unchanged
    rn_cfg = get_model_config("tiny-rn")
    assert isinstance(rn_cfg.vision, ResNetConfig)
    depth = rn_cfg.vision.layers[0] + 1
    cfg = rn_cfg.replace(vision={"layers": (depth, 1, 1, 1)})
    rn = create_model(cfg, device="meta")
    assert isinstance(rn.visual, ModifiedResNet)
    assert len(rn.visual.layer1) == depth


@pytest.mark.parametrize("name", [*PAPER_MODELS, *TINY_MODELS])
def test_to_dict_from_dict_round_trip(name: str, tmp_path: Path) -> None:
    cfg = get_model_config(name)
    data = cfg.to_dict()
    assert data["name"] == name
    assert ModelConfig.from_dict(data) == cfg
    via_json = json.loads(json.dumps(data))  # plain JSON types only
    assert via_json == data
    assert ModelConfig.from_dict(via_json) == cfg
    path = tmp_path / "other-name.json"
    path.write_text(json.dumps(via_json), encoding="utf-8")
    assert load_config_file(path) == cfg  # an explicit name wins over the file stem


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    ("name", "expected"),
    [("ViT-B-32", 151_277_313), ("ViT-L-14", 427_616_513), ("RN50", 102_007_137)],
)
def test_parameter_counts_match_paper(name: str, expected: int) -> None:
    assert parameter_count(get_model_config(name)) == expected


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", TINY_MODELS)
def test_forward_shapes_norms_and_logit_scale(tiny_models: dict[str, CLIP], name: str) -> None:
    model = tiny_models[name]
    dim = model.config.embed_dim
    images = make_images(model, 3)
    tokens = make_tokens(model, [4, 9, model.context_length - 1])
    with torch.no_grad():
        image_emb = model.encode_image(images)
        text_emb = model.encode_text(tokens)
        out = model(images, tokens)
    assert image_emb.shape == (3, dim)
    assert text_emb.shape == (3, dim)
    assert out.image_features.shape == (3, dim)
    assert out.text_features.shape == (3, dim)
    ones = torch.ones(3)
    torch.testing.assert_close(out.image_features.norm(dim=-1), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_features.norm(dim=-1), ones, atol=1e-5, rtol=0)
    # unnormalised embeddings are not unit-norm, so the normalisation is really done here
    assert (image_emb.norm(dim=-1) - 1).abs().max() > 1e-3
    torch.testing.assert_close(out.image_features, F.normalize(image_emb, dim=-1))
    torch.testing.assert_close(out.text_features, F.normalize(text_emb, dim=-1))
    assert out.logit_scale.shape == ()
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)


def test_clamp_logit_scale() -> None:
    model = create_model("tiny-vit")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


# --------------------------------------------------------------------------- text tower


def test_text_feature_is_taken_at_eos(tiny_models: dict[str, CLIP]) -> None:
    model = tiny_models["tiny-vit"]
    L = model.context_length
    eos = [5, L // 2, L - 3]
    tokens = make_tokens(model, eos)
    vocab = model.config.text.vocab_size
    with torch.no_grad():
        base = model.encode_text(tokens)
        # tokens after the EOS cannot influence it: attention is causal
        after = tokens.clone()
        gen = torch.Generator().manual_seed(7)
        for row, pos in enumerate(eos):
            after[row, pos + 1 :] = torch.randint(1, vocab - 2, (L - pos - 1,), generator=gen)
        assert not torch.equal(after, tokens)
        torch.testing.assert_close(model.encode_text(after), base, atol=1e-6, rtol=0)
        # a shorter context (no padding at all) gives the same features
        short = tokens[:, : max(eos) + 1]
        torch.testing.assert_close(model.encode_text(short)[2], base[2], atol=1e-5, rtol=1e-5)
        # a token before the EOS does change it
        before = tokens.clone()
        before[:, 2] = (before[:, 2] + 1) % (vocab - 2) + 1
        diff = (model.encode_text(before) - base).abs().amax(dim=-1)
        assert bool((diff > 1e-3).all())
        # the pooled position is where the highest id sits: move EOS one step left
        moved = tokens.clone()
        moved[0, 5] = 0
        moved[0, 4] = vocab - 1
        changed = model.encode_text(moved)
        assert (changed[0] - base[0]).abs().max() > 1e-3
        torch.testing.assert_close(changed[1:], base[1:], atol=1e-5, rtol=1e-5)


def test_text_feature_equals_manual_pooling(tiny_models: dict[str, CLIP]) -> None:
    model = tiny_models["tiny-vit"]
    eos = [3, model.context_length - 2]
    tokens = make_tokens(model, eos)
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        for block in model.transformer.resblocks:
            x = block(x, causal=True)
        x = model.ln_final(x)
        expected = torch.stack([x[0, eos[0]], x[1, eos[1]]]) @ model.text_projection
        torch.testing.assert_close(model.encode_text(tokens), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_batch_independence(tiny_models: dict[str, CLIP], name: str) -> None:
    model = tiny_models[name]
    L = model.context_length
    images = make_images(model, 4)
    tokens = make_tokens(model, [3, 8, L // 2 + 3, L - 1])
    other_images = make_images(model, 4, seed=11)
    other_tokens = make_tokens(model, [L - 2, 2, 9, 6], seed=12)
    with torch.no_grad():
        image_emb = model.encode_image(images)
        text_emb = model.encode_text(tokens)
        for i in range(4):
            torch.testing.assert_close(
                model.encode_image(images[i : i + 1])[0], image_emb[i], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                model.encode_text(tokens[i : i + 1])[0], text_emb[i], atol=1e-5, rtol=1e-5
            )
            mixed_images = other_images.clone()
            mixed_images[i] = images[i]
            mixed_tokens = other_tokens.clone()
            mixed_tokens[i] = tokens[i]
            torch.testing.assert_close(
                model.encode_image(mixed_images)[i], image_emb[i], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                model.encode_text(mixed_tokens)[i], text_emb[i], atol=1e-5, rtol=1e-5
            )
        # and the rows really differ from each other (the check above is not vacuous)
        assert (image_emb[0] - image_emb[1]).abs().max() > 1e-3
        assert (text_emb[0] - text_emb[1]).abs().max() > 1e-3


def test_context_longer_than_context_length_raises(tiny_models: dict[str, CLIP]) -> None:
    model = tiny_models["tiny-vit"]
    tokens = make_tokens(model, [5], length=model.context_length + 1)
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(tokens)
    ok = make_tokens(model, [5], length=model.context_length)
    assert model.encode_text(ok).shape == (1, model.config.embed_dim)


# --------------------------------------------------------------------------- attention


def naive_attention(attn: SelfAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out by hand, then the output projection."""
    B, L, D = x.shape
    H = attn.heads
    d = D // H
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).split(D, dim=-1)  # [B, L, D] x3

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, L, H, d).transpose(1, 2)  # [B, H, L, d]

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d)  # [B, H, L, L]
    if causal:
        future = torch.ones(L, L, dtype=torch.bool).triu(diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ heads(v)  # [B, H, L, d]
    y = y.transpose(1, 2).reshape(B, L, D)
    return y @ attn.out_proj.weight.T + attn.out_proj.bias


def random_attention(width: int, heads: int, seed: int) -> SelfAttention:
    torch.manual_seed(seed)
    attn = SelfAttention(width, heads)
    with torch.no_grad():
        nn.init.normal_(attn.in_proj_weight, std=width**-0.5)
        nn.init.normal_(attn.in_proj_bias, std=0.1)
        nn.init.normal_(attn.out_proj.bias, std=0.1)
    return attn


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [1, 4])
def test_self_attention_matches_naive_reference(causal: bool, heads: int) -> None:
    attn = random_attention(32, heads, seed=heads)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = attn(x, causal=causal)
        ref = naive_attention(attn, x, causal)
        other = naive_attention(attn, x, not causal)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert (y - other).abs().max() > 1e-3  # the mask matters for these inputs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_self_attention_matches_torch_multihead_attention(causal: bool) -> None:
    width, heads, L = 48, 6, 9
    attn = random_attention(width, heads, seed=3)
    mha = nn.MultiheadAttention(width, heads, batch_first=True)
    # same parameter names and shapes: a strict load succeeds only if the layouts agree
    assert {k: v.shape for k, v in attn.state_dict().items()} == {
        k: v.shape for k, v in mha.state_dict().items()
    }
    mha.load_state_dict(attn.state_dict(), strict=True)
    mha.eval()
    x = torch.randn(2, L, width, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(L, L, dtype=torch.bool).triu(diagonal=1) if causal else None
    with torch.no_grad():
        ref, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
        y = attn(x, causal=causal)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_block_parameter_names_are_openai() -> None:
    block = ResidualAttentionBlock(16, 2, 4.0, "quick_gelu")
    assert sorted(block.state_dict()) == sorted(
        [
            "ln_1.weight",
            "ln_1.bias",
            "attn.in_proj_weight",
            "attn.in_proj_bias",
            "attn.out_proj.weight",
            "attn.out_proj.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
        ]
    )
    assert block.mlp.c_fc.weight.shape == (64, 16)


# --------------------------------------------------------------------------- activations


def test_quick_gelu_formula() -> None:
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x), atol=1e-7, rtol=0)
    assert QuickGELU()(torch.tensor(1.0)).item() == pytest.approx(1 / (1 + math.exp(-1.702)))
    assert QuickGELU()(torch.tensor(-2.0)).item() == pytest.approx(-2 / (1 + math.exp(3.404)))
    # it is an approximation, not the exact erf GELU
    assert abs(QuickGELU()(torch.tensor(1.0)).item() - F.gelu(torch.tensor(1.0)).item()) > 1e-3


def mlp_activations(model: CLIP) -> list[nn.Module]:
    return [m.mlp.gelu for m in model.modules() if isinstance(m, ResidualAttentionBlock)]


def test_activation_config_selects_the_layer() -> None:
    quick = make_model("tiny-vit")
    exact = make_model("tiny-vit", activation="gelu")
    quick_acts, exact_acts = mlp_activations(quick), mlp_activations(exact)
    cfg = quick.config
    assert isinstance(cfg.vision, ViTConfig)
    assert len(quick_acts) == len(exact_acts) == cfg.text.layers + cfg.vision.layers
    assert all(type(a) is QuickGELU for a in quick_acts)
    assert all(type(a) is nn.GELU for a in exact_acts)
    assert all(a.approximate == "none" for a in exact_acts if isinstance(a, nn.GELU))
    # same weights, different activation -> different outputs: the layer is really used
    exact.load_state_dict(quick.state_dict())
    images = make_images(quick, 2)
    tokens = make_tokens(quick, [4, quick.context_length - 1])
    with torch.no_grad():
        assert (quick.encode_image(images) - exact.encode_image(images)).abs().max() > 1e-4
        assert (quick.encode_text(tokens) - exact.encode_text(tokens)).abs().max() > 1e-4


# --------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("name", TINY_MODELS)
def test_grad_checkpointing_same_loss_and_grads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = make_model(name).train()
    checkpointed = copy.deepcopy(reference)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.transformer.grad_checkpointing
    images = make_images(reference, 4)
    L = reference.context_length
    tokens = make_tokens(reference, [3, 8, L // 2 + 3, L - 1])

    # with checkpointing every block's forward runs again during backward (module hooks do
    # not fire on the recomputation, so count calls of the forward method itself)
    blocks = [checkpointed.transformer.resblocks[0]]
    if isinstance(checkpointed.visual, VisionTransformer):
        blocks.append(checkpointed.visual.transformer.resblocks[0])
    else:  # a ResNet tower: every bottleneck, the last of the last stage included
        blocks += [checkpointed.visual.layer1[0], checkpointed.visual.layer4[-1]]
    calls = [0] * len(blocks)

    def counting(i: int, forward: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[i] += 1
            return forward(*args, **kwargs)

        return wrapped

    for i, block in enumerate(blocks):
        monkeypatch.setattr(block, "forward", counting(i, block.forward))

    losses = []
    for model in (reference, checkpointed):
        loss = contrastive_loss(*model(images, tokens))
        loss.backward()
        losses.append(loss.detach())
    assert calls == [2] * len(blocks)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    ref_params = dict(reference.named_parameters())
    n_grads = 0
    for pname, param in checkpointed.named_parameters():
        expected = ref_params[pname].grad
        if expected is None:
            assert param.grad is None, pname
            continue
        assert param.grad is not None, pname
        torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5, msg=pname)
        n_grads += 1
    assert n_grads > 20
    # BatchNorm counts the batch once, although its forward ran twice (running stats equal)
    ref_buffers = dict(reference.named_buffers())
    n_stats = 0
    for bname, buffer in checkpointed.named_buffers():
        if "running_" in bname or "num_batches" in bname:
            torch.testing.assert_close(buffer, ref_buffers[bname], atol=0, rtol=0, msg=bname)
            n_stats += 1
    assert n_stats > 0 or isinstance(checkpointed.visual, VisionTransformer)

    checkpointed.set_grad_checkpointing(False)
    assert not checkpointed.transformer.grad_checkpointing
    if isinstance(checkpointed.visual, VisionTransformer):
        assert not checkpointed.visual.transformer.grad_checkpointing
    else:
        assert not checkpointed.visual.grad_checkpointing


# --------------------------------------------------------------------------- ResNet tower


@pytest.fixture(scope="module")
def rn50_meta() -> CLIP:
    return create_model("RN50", device="meta")


def test_resnet_stem_has_three_convs(rn50_meta: CLIP) -> None:
    visual = rn50_meta.visual
    assert isinstance(visual, ModifiedResNet)
    w = rn50_meta.config.vision.width
    stem_convs = [m for m in visual.children() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in stem_convs] == [
        (3, w // 2),
        (w // 2, w // 2),
        (w // 2, w),
    ]
    assert [c.stride for c in stem_convs] == [(2, 2), (1, 1), (1, 1)]
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in stem_convs)
    assert isinstance(visual.avgpool, nn.AvgPool2d)
    assert visual.avgpool.kernel_size == 2


def test_resnet_anti_aliased_downsampling(rn50_meta: CLIP) -> None:
    visual = rn50_meta.visual
    assert isinstance(visual, ModifiedResNet)
    w = rn50_meta.config.vision.width
    stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    assert [len(s) for s in stages] == [3, 4, 6, 3]
    for index, stage in enumerate(stages):
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        assert convs
        assert all(c.stride == (1, 1) for c in convs)  # no strided conv anywhere
        out_channels = w * 4 * 2**index
        for b, block in enumerate(stage):
            assert isinstance(block, Bottleneck)
            assert block.conv3.out_channels == out_channels
            if b == 0:
                assert isinstance(block.downsample, nn.Sequential)
                keys = [name for name, _ in block.downsample.named_children()]
                assert keys == ["-1", "0", "1"]
                pool, conv, bn = block.downsample
                assert isinstance(pool, nn.AvgPool2d)
                assert isinstance(conv, nn.Conv2d)
                assert conv.kernel_size == (1, 1)
                assert isinstance(bn, nn.BatchNorm2d)
                stride = 1 if index == 0 else 2
                assert pool.kernel_size == stride
                if stride > 1:
                    assert isinstance(block.avgpool, nn.AvgPool2d)
                    assert block.avgpool.kernel_size == 2
                else:
                    assert isinstance(block.avgpool, nn.Identity)
            else:
                assert isinstance(block.avgpool, nn.Identity)
                assert block.downsample is None


def test_resnet_shapes_and_attnpool(tiny_models: dict[str, CLIP]) -> None:
    model = tiny_models["tiny-rn"]
    visual = model.visual
    assert isinstance(visual, ModifiedResNet)
    w, R = model.config.vision.width, model.image_size
    images = make_images(model, 2)
    with torch.no_grad():
        assert visual.stem(images).shape == (2, w, R // 4, R // 4)
        assert visual.trunk(images).shape == (2, 32 * w, R // 32, R // 32)
        assert model.encode_image(images).shape == (2, model.config.embed_dim)
    assert visual.attnpool.c_proj.out_features == model.config.embed_dim
    assert visual.attnpool.positional_embedding.shape == ((R // 32) ** 2 + 1, 32 * w)


def openai_attention_pool(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """OpenAI's AttentionPool2d.forward (sequence-first, F.multi_head_attention_forward)."""
    x = x.flatten(start_dim=2).permute(2, 0, 1)  # [HW, B, C]
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # [HW+1, B, C]
    x = x + pool.positional_embedding[:, None, :]
    out, _ = F.multi_head_attention_forward(
        query=x[:1],
        key=x,
        value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=pool.heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    return out.squeeze(0)


def test_attention_pool_matches_openai_formulation() -> None:
    torch.manual_seed(0)
    pool = AttentionPool2d(spatial_dim=3, embed_dim=64, heads=4, output_dim=24)
    x = torch.randn(2, 64, 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = pool(x)
        ref = openai_attention_pool(pool, x)
    assert y.shape == (2, 24)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_image_features_are_pre_projection(tiny_models: dict[str, CLIP], name: str) -> None:
    model = tiny_models[name]
    images = make_images(model, 2)
    with torch.no_grad():
        feats = model.image_features(images)
        emb = model.encode_image(images)
    if isinstance(model.visual, VisionTransformer):
        assert feats.shape == (2, model.config.vision.width)  # ViT: the vision width
        projected = feats @ model.visual.proj
    else:
        assert isinstance(model.visual, ModifiedResNet)
        assert feats.shape == (2, 32 * model.config.vision.width)  # RN: 32 x width
        projected = model.visual.attnpool.c_proj(feats)
    torch.testing.assert_close(projected, emb, atol=1e-5, rtol=1e-5)


def test_vit_structure() -> None:
    model = create_model("ViT-L-14-336", device="meta")
    visual = model.visual
    assert isinstance(visual, VisionTransformer)
    assert visual.conv1.bias is None
    assert visual.conv1.kernel_size == (14, 14)
    assert visual.conv1.stride == (14, 14)
    assert visual.positional_embedding.shape == ((336 // 14) ** 2 + 1, 1024)
    assert visual.class_embedding.shape == (1024,)
    assert visual.proj.shape == (1024, 768)
    assert len(visual.transformer.resblocks) == 24
