"""Tests for the procedural image-caption generator ``clip_core.synthetic``."""

from __future__ import annotations

import io
import re
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clip_core.synthetic import (
    COLOURS,
    COUNTS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    TEXTURES,
    Attributes,
    SyntheticConfig,
    SyntheticSample,
    class_prompts,
    encode_png,
    generate,
    held_out_compositions,
    label_of,
    near_duplicate,
)

N_TRAIN = 2000
N_TEST = 1000
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SIZE_WORDS = {"small": {"small", "little"}, "medium": {"medium"}, "large": {"large", "big"}}
TEXTURE_WORDS = {
    "solid": {"solid", "filled"},
    "striped": {"striped"},
    "dotted": {"dotted", "polka"},
    "outlined": {"outlined", "hollow"},
}


def plural(shape: str) -> str:
    return "crosses" if shape == "cross" else shape + "s"


def tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def train() -> list[SyntheticSample]:
    return list(generate(N_TRAIN, "train"))


@pytest.fixture(scope="module")
def test_split() -> list[SyntheticSample]:
    return list(generate(N_TEST, "test"))


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_sizes_and_distinct_colours() -> None:
    assert len(SHAPES) >= 6 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLOURS) >= 8
    assert (SIZES, TEXTURES, COUNTS) == (
        ("small", "medium", "large"),
        ("solid", "striped", "dotted", "outlined"),
        (1, 2, 3),
    )
    assert len(POSITIONS) == 5 and "center" in POSITIONS
    assert set(STYLES) == {"default", "sketch", "noisy", "blur"}
    rgb = np.array(list(COLOURS.values()), dtype=np.float32)
    dists = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e3
    assert dists.min() > 80, "named colours must be clearly distinguishable"


# --------------------------------------------------------------------------- determinism


def test_same_config_gives_identical_samples() -> None:
    cfg = SyntheticConfig(seed=7)
    a, b = list(generate(40, "train", cfg)), list(generate(40, "train", cfg))
    assert [encode_png(s.image) for s in a] == [encode_png(s.image) for s in b]
    assert [(s.key, s.caption, s.attributes) for s in a] == [
        (s.key, s.caption, s.attributes) for s in b
    ]


def test_start_offset_matches_full_run() -> None:
    full = list(generate(15, "test"))
    tail = list(generate(10, "test", start=5))
    assert [s.key for s in tail] == [f"synth-test-{i:08d}" for i in range(5, 15)]
    assert [encode_png(s.image) for s in tail] == [encode_png(s.image) for s in full[5:]]
    assert [s.caption for s in tail] == [s.caption for s in full[5:]]


def test_seed_and_split_change_content() -> None:
    base = list(generate(20, "train"))
    other_seed = list(generate(20, "train", SyntheticConfig(seed=1)))
    other_split = list(generate(20, "test"))
    assert all(s.split == "train" for s in base) and other_split[0].split == "test"
    for other in (other_seed, other_split):
        assert sum(a.caption != b.caption for a, b in zip(base, other, strict=True)) >= 15


def test_image_size_and_mode() -> None:
    for size in (32, 96):
        sample = next(generate(1, "train", SyntheticConfig(image_size=size)))
        assert sample.image.size == (size, size) and sample.image.mode == "RGB"


# --------------------------------------------------------------------------- splits


def test_held_out_pairs_never_in_train(
    train: list[SyntheticSample], test_split: list[SyntheticSample]
) -> None:
    held = held_out_compositions(SyntheticConfig())
    n_pairs = len(COLOURS) * len(SHAPES)
    assert len(held) == round(0.2 * n_pairs)
    train_pairs = {s.attributes.composition for s in train}
    test_pairs = {s.attributes.composition for s in test_split}
    assert not train_pairs & held
    assert len(held & test_pairs) >= len(held) - 1  # ~12 samples per pair: all should show up
    assert len(test_pairs - held) >= 40, "test also contains seen compositions"
    assert {s.attributes.colour for s in train} == set(COLOURS)
    assert {s.attributes.shape for s in train} == set(SHAPES)


def test_held_out_set_depends_on_seed_and_fraction() -> None:
    assert held_out_compositions(SyntheticConfig(held_out_fraction=0.0)) == frozenset()
    a = held_out_compositions(SyntheticConfig(seed=0))
    assert a == held_out_compositions(SyntheticConfig(seed=0, style="blur"))
    assert a != held_out_compositions(SyntheticConfig(seed=1))
    extreme = held_out_compositions(SyntheticConfig(held_out_fraction=0.99))
    seen = {(c, s) for c in COLOURS for s in SHAPES} - extreme
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)


# --------------------------------------------------------------------------- captions


def check_caption(caption: str, attrs: Attributes) -> None:
    words = tokens(caption)
    assert not set(words) & (set(COLOURS) - {attrs.colour}), caption
    if attrs.count == 1:
        assert attrs.shape in words and plural(attrs.shape) not in words, caption
        assert not {"two", "three"} & set(words), caption
    else:
        assert plural(attrs.shape) in words and NUMBER_WORDS[attrs.count] in words, caption
    other_shapes = set(SHAPES) - {attrs.shape}
    assert not set(words) & (other_shapes | {plural(s) for s in other_shapes}), caption
    for size, synonyms in SIZE_WORDS.items():
        assert size == attrs.size or not synonyms & set(words), caption
    for texture, synonyms in TEXTURE_WORDS.items():
        assert texture == attrs.texture or not synonyms & set(words), caption
    lowered = caption.lower()
    for position in POSITIONS:
        if position != "center" and position in lowered:
            assert attrs.position == position, caption
    if "center" in lowered or "middle" in lowered:
        assert attrs.position == "center", caption
    assert not re.search(r"\ba [aeiou]", lowered) and not re.search(r"\ban [^aeiou]", lowered)


def test_captions_describe_attributes(train: list[SyntheticSample]) -> None:
    for sample in train:
        check_caption(sample.caption, sample.attributes)
    mentions_colour = np.mean([s.attributes.colour in tokens(s.caption) for s in train])
    assert mentions_colour > 0.8
    mentions_size = np.mean(
        [bool(SIZE_WORDS[s.attributes.size] & set(tokens(s.caption))) for s in train]
    )
    assert 0.2 < mentions_size < 0.8, "captions choose which attributes to mention"


def test_captions_are_varied(train: list[SyntheticSample]) -> None:
    frames = {" ".join(tokens(s.caption)[:2]) for s in train[:500]}
    assert len(frames) >= 10
    assert len({s.caption for s in train}) > 0.5 * len(train)
    assert any(s.caption[0].isupper() for s in train) and any(s.caption[0].islower() for s in train)


# --------------------------------------------------------------------------- pixels


def dominant_object_colour(image: Image.Image) -> np.ndarray:
    arr = pixels(image)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    far = np.linalg.norm(arr - background, axis=-1) > 60
    assert far.sum() >= 20, "object pixels must stand out from the background"
    return np.median(arr[far], axis=0)


def test_solid_objects_have_their_named_colour(train: list[SyntheticSample]) -> None:
    solid = [s for s in train if s.attributes.texture == "solid"][:300]
    assert len(solid) >= 200
    names = list(COLOURS)
    rgb = np.array([COLOURS[n] for n in names], dtype=np.float32)
    for sample in solid:
        found = dominant_object_colour(sample.image)
        assert np.abs(found - rgb[names.index(sample.attributes.colour)]).max() < 25, sample.key
        nearest = names[int(np.linalg.norm(rgb - found, axis=1).argmin())]
        assert nearest == sample.attributes.colour, sample.key


def mean_gradient(image: Image.Image) -> float:
    grey = pixels(image).mean(axis=-1)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def test_styles_change_pixels_but_not_labels() -> None:
    n = 40
    default = list(generate(n, "test"))
    for style in STYLES[1:]:
        shifted = list(generate(n, "test", SyntheticConfig(style=style)))
        assert [s.attributes for s in shifted] == [s.attributes for s in default]
        assert [s.key for s in shifted] == [s.key for s in default]
        for a, b in zip(default, shifted, strict=True):
            assert np.abs(pixels(a.image) - pixels(b.image)).mean() > 2, (style, a.key)
    sketch = list(generate(n, "test", SyntheticConfig(style="sketch")))
    assert all((pixels(s.image).min(axis=-1) > 245).mean() > 0.6 for s in sketch)
    noisy = list(generate(n, "test", SyntheticConfig(style="noisy")))
    assert all(
        pixels(s.image).mean() < pixels(d.image).mean() - 40
        for s, d in zip(noisy, default, strict=True)
    )
    blur = list(generate(n, "test", SyntheticConfig(style="blur")))
    assert all(
        mean_gradient(b.image) < mean_gradient(d.image) for b, d in zip(blur, default, strict=True)
    )


# --------------------------------------------------------------------------- near duplicates


def unit_vector(image: Image.Image) -> np.ndarray:
    v = pixels(image.resize((16, 16), Image.Resampling.BOX)).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def test_near_duplicate_is_deterministic_and_different() -> None:
    image = next(generate(1, "train")).image
    a, b, c = near_duplicate(image, 3), near_duplicate(image, 3), near_duplicate(image, 4)
    assert encode_png(a) == encode_png(b)
    assert encode_png(a) != encode_png(c)
    assert encode_png(a) != encode_png(image)
    assert abs(a.width - image.width) <= 0.15 * image.width and a.height == image.height


def test_near_duplicate_stays_visually_close() -> None:
    samples = list(generate(120, "train", start=5000))
    dups = [near_duplicate(s.image, seed=i) for i, s in enumerate(samples)]
    mads = [
        np.abs(
            pixels(d.resize(s.image.size, Image.Resampling.BILINEAR).resize((16, 16)))
            - pixels(s.image.resize((16, 16)))
        ).mean()
        for s, d in zip(samples, dups, strict=True)
    ]
    assert np.mean(mads) < 16 and max(mads) < 45
    originals = np.stack([unit_vector(s.image) for s in samples])
    queries = np.stack([unit_vector(d) for d in dups])
    top1 = (queries @ originals.T).argmax(axis=1)
    assert (top1 == np.arange(len(samples))).mean() > 0.85


# --------------------------------------------------------------------------- labels & encoding


def test_class_prompts_and_labels(test_split: list[SyntheticSample]) -> None:
    assert class_prompts("shape") == list(SHAPES)
    assert class_prompts("colour") == list(COLOURS) == class_prompts("color")
    assert class_prompts("count") == ["one", "two", "three"]
    for sample in test_split[:200]:
        attrs = sample.attributes
        for attribute in ("shape", "colour", "size", "texture"):
            label = label_of(sample, attribute)
            assert class_prompts(attribute)[label] == getattr(attrs, attribute)
        assert label_of(sample, "count") == attrs.count - 1
        if attrs.count == 1:
            assert class_prompts("position")[label_of(sample, "position")] == attrs.position
        else:
            assert attrs.position is None
            with pytest.raises(ValueError, match="position"):
                label_of(sample, "position")
    with pytest.raises(ValueError, match="unknown attribute"):
        class_prompts("weight")


def test_encode_png_is_deterministic_and_lossless() -> None:
    image = next(generate(1, "train")).image
    tagged = image.copy()
    tagged.info["comment"] = "metadata must not leak into the bytes"
    data = encode_png(image)
    assert data == encode_png(image) == encode_png(tagged)
    assert data.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(data)) as decoded:
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"style": "watercolour"}, "unknown style"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"held_out_fraction": 1.0}, "held_out_fraction"),
        ({"held_out_fraction": -0.1}, "held_out_fraction"),
        ({"held_out_fraction": float("nan")}, "held_out_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SyntheticConfig(), **changes)


def test_generate_validates_eagerly() -> None:
    with pytest.raises(ValueError, match="split"):
        generate(1, "validation")
    with pytest.raises(ValueError, match="n must"):
        generate(-1, "train")
    with pytest.raises(ValueError, match="start"):
        generate(1, "train", start=-3)


def test_throughput() -> None:
    start = time.perf_counter()
    images = [s.image for s in generate(500, "train", start=10_000)]
    elapsed = time.perf_counter() - start
    assert len(images) == 500
    assert elapsed < 10.0, f"500 images took {elapsed:.1f}s"
