"""Zero-shot classifier, metrics, batched logits, cache and ensembling gain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from clip_core import CLIP, create_model
from clip_core.synthetic import class_prompts, generate
from clip_core.tokenizer import ClipTokenizer
from clip_core.zeroshot import (
    DATASET_TEMPLATES,
    DEFAULT_TEMPLATE,
    IMAGENET_TEMPLATES,
    ClassifierCache,
    build_classifier,
    classification_metrics,
    ensembling_gain,
    mean_per_class_recall,
    templates_for,
    topk_accuracy,
    weights_fingerprint,
    zero_shot_logits,
)

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a {} on a background.")


@pytest.fixture(scope="module")
def tiny() -> tuple[CLIP, ClipTokenizer]:
    torch.manual_seed(0)
    model = create_model("tiny-vit").eval()
    captions = [s.caption for s in generate(200, "train")]
    captions += [t.format(c) for t in (*TEMPLATES, "{}") for c in class_prompts("shape")]
    tokenizer = ClipTokenizer.train(captions, 600, context_length=model.context_length)
    return model, tokenizer


def test_classifier_equals_direct_computation(tiny: tuple[CLIP, ClipTokenizer]) -> None:
    model, tok = tiny
    names = class_prompts("shape")
    weights = build_classifier(model.encode_text, tok, names, TEMPLATES)  # [C, D]
    assert weights.shape == (len(names), model.config.embed_dim)
    with torch.no_grad():
        for c, name in enumerate(names):
            # one prompt at a time, plain loops: normalise, average, renormalise
            embs = []
            for t in TEMPLATES:
                e = model.encode_text(tok([t.format(name)]))[0]  # [D]
                embs.append(e / e.norm())
            mean = torch.stack(embs).mean(0)  # [D]
            torch.testing.assert_close(weights[c], mean / mean.norm(), atol=1e-5, rtol=1e-4)
    # averaging without per-prompt normalisation gives a different classifier
    with torch.no_grad():
        raw = model.encode_text(tok([t.format(names[0]) for t in TEMPLATES])).mean(0)  # [D]
    assert not torch.allclose(F.normalize(raw, dim=-1), weights[0], atol=1e-6)


def test_zero_shot_logits_batched_equals_full(tiny: tuple[CLIP, ClipTokenizer]) -> None:
    model, tok = tiny
    weights = build_classifier(model.encode_text, tok, class_prompts("shape"), TEMPLATES)
    images = torch.randn(10, 3, model.image_size, model.image_size)  # [N, 3, R, R]
    seen: list[int] = []
    model.train()
    logits = zero_shot_logits(
        model, images.split(3), weights, logit_scale=100.0, on_batch=seen.append
    )
    assert model.training  # mode restored
    assert seen == [3, 3, 3, 1]
    with torch.no_grad():
        model.eval()
        direct = 100.0 * F.normalize(model.encode_image(images), dim=-1) @ weights.T
    torch.testing.assert_close(logits, direct, atol=1e-4, rtol=1e-4)
    assert zero_shot_logits(model, [], weights).shape == (0, weights.shape[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, c = 200, 7
    logits = torch.randn(n, c, generator=gen)
    labels = torch.randint(0, c, (n,), generator=gen)
    y = labels.numpy()
    scores = logits.numpy()
    for k in (1, 3, 5):
        expected = top_k_accuracy_score(y, scores, k=k, labels=np.arange(c))
        assert topk_accuracy(logits, labels, k) == pytest.approx(expected, abs=1e-6)
    expected_bal = balanced_accuracy_score(y, scores.argmax(1))
    assert mean_per_class_recall(logits, labels) == pytest.approx(expected_bal, abs=1e-6)
    m = classification_metrics(logits, labels)
    assert set(m) == {"top1", "top5", "mean_per_class_recall"}
    assert classification_metrics(logits[:, :4], labels.clamp(max=3)).keys() == {
        "top1",
        "mean_per_class_recall",
    }


def test_cache_lru_and_keys(tiny: tuple[CLIP, ClipTokenizer]) -> None:
    model, tok = tiny
    cache = ClassifierCache(maxsize=2)
    key = weights_fingerprint(model)
    names = class_prompts("shape")
    a = cache.get_or_build(key, model.encode_text, tok, classnames=names, templates=TEMPLATES)
    b = cache.get_or_build(key, model.encode_text, tok, classnames=names, templates=TEMPLATES)
    assert a is b and (cache.hits, cache.misses) == (1, 1)
    cache.get_or_build(key, model.encode_text, tok, classnames=names[:3])
    cache.get_or_build("other", model.encode_text, tok, classnames=names[:3])
    assert len(cache) == 2 and cache.misses == 3
    cache.get_or_build(key, model.encode_text, tok, classnames=names, templates=TEMPLATES)
    assert cache.misses == 4  # the first entry was evicted (least recently used)


def test_fingerprint_tracks_weights() -> None:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    before = weights_fingerprint(m)
    assert weights_fingerprint(m) == before
    with torch.no_grad():
        m.weight[0, 0] += 1e-3
    assert weights_fingerprint(m) != before


def test_ensembling_gain(tiny: tuple[CLIP, ClipTokenizer]) -> None:
    model, tok = tiny
    names = class_prompts("shape")
    ens = build_classifier(model.encode_text, tok, names, TEMPLATES)  # [C, D]
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(names), (64,), generator=gen)
    # image embeddings close to the ensemble's class vectors: the ensemble is ~perfect
    feats = ens[labels] + 0.05 * torch.randn(64, ens.shape[1], generator=gen)  # [N, D]
    gain = ensembling_gain(
        model.encode_text, tok, feats, labels, classnames=names, templates=TEMPLATES
    )
    assert gain.ensemble["top1"] == 1.0
    for name, temps in (("bare", ("{}",)), ("single", (DEFAULT_TEMPLATE,))):
        w = build_classifier(model.encode_text, tok, names, temps)
        expected = topk_accuracy(F.normalize(feats, dim=-1) @ w.T, labels, 1)
        assert getattr(gain, name)["top1"] == pytest.approx(expected)
    assert gain.gain()["ensemble_vs_bare"] == pytest.approx(1.0 - gain.bare["top1"])


def test_templates() -> None:
    assert all("{}" in t for ts in DATASET_TEMPLATES.values() for t in ts)
    assert "a photo of a {}, a type of pet." in templates_for("oxford_pets")
    assert templates_for("unknown") == IMAGENET_TEMPLATES == templates_for(None)


def test_documented_templates_match_the_code() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    for name, templates in {"imagenet": IMAGENET_TEMPLATES, **DATASET_TEMPLATES}.items():
        for template in templates:
            assert f"`{template}`" in doc, (name, template)
