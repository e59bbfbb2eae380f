"""The built-in corpora's honesty rules: training captions that are not evaluation prompts,
held-out Tux Paint stamps that are never trained on, and the demo mix's interleaving."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from clip_core.yamlio import load_yaml
from clip_core.zeroshot import (
    BARE_TEMPLATE,
    DATASET_TEMPLATES,
    DEFAULT_TEMPLATES,
    IMAGENET_TEMPLATES,
)
from clip_data.corpora import (
    FASHION_MNIST_CLASSES,
    FASHION_NAMES,
    FASHION_TRAIN_TEMPLATES,
    TUXPAINT_TEST_PERCENT,
    fashion_caption,
    read_tuxpaint,
    source_requirements,
)
from clip_data.errors import MissingDatasetError, SourceError
from clip_data.sources import open_source

ROOT = Path(__file__).resolve().parent.parent


def _evaluation_templates() -> set[str]:
    """Every template any shipped evaluation may use: clip_core's lists and every suite's."""
    found = {BARE_TEMPLATE, *DEFAULT_TEMPLATES, *IMAGENET_TEMPLATES}
    found |= {t for templates in DATASET_TEMPLATES.values() for t in templates}
    suites = [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "clip_eval" / "suites").glob("*.yaml")]
    for suite in suites:
        for task in load_yaml(suite.read_text(encoding="utf-8")).get("tasks", []):
            found |= set((task.get("options") or {}).get("templates", []))
    return found


def _norm(text: str) -> str:
    return " ".join(text.lower().rstrip(".").split())


def test_fashion_training_captions_are_never_an_evaluation_prompt() -> None:
    classes = [c.lower() for c in FASHION_MNIST_CLASSES]
    prompts = {_norm(t.format(c)) for t in _evaluation_templates() for c in classes}
    assert len(prompts) > 100 and _norm("a photo of a trouser.") in prompts
    possible = {t.format(n) for t in FASHION_TRAIN_TEMPLATES for ns in FASHION_NAMES for n in ns}
    assert not {_norm(c) for c in possible} & prompts
    # nor is a training template an evaluation template with its article written out
    evaluation = {_norm(t) for t in _evaluation_templates()}
    assert not {_norm(t.replace("{}", "a {}")) for t in FASHION_TRAIN_TEMPLATES} & evaluation
    assert not {_norm(t) for t in FASHION_TRAIN_TEMPLATES} & evaluation


def test_fashion_captions_name_the_class_or_a_synonym() -> None:
    assert [names[0] for names in FASHION_NAMES] == [
        ("an " if c.lower()[0] in "aeiou" else "a ") + c.lower() for c in FASHION_MNIST_CLASSES
    ]
    used: Counter[tuple[int, str]] = Counter()
    templates: Counter[str] = Counter()
    for index, label in itertools.product(range(600), range(10)):
        caption = fashion_caption(index, label)
        pairs = [
            (t, n)
            for t in FASHION_TRAIN_TEMPLATES
            for n in FASHION_NAMES[label]
            if t.format(n) == caption
        ]
        assert len(pairs) == 1, (caption, pairs)
        used[(label, pairs[0][1])] += 1
        templates[pairs[0][0]] += 1
    for label, names in enumerate(FASHION_NAMES):
        share = used[(label, names[0])] / 600  # the evaluation's class name: a third
        assert 0.25 < share < 0.42, (names[0], share)
        assert all(used[(label, n)] > 0 for n in names)
    assert set(templates) == set(FASHION_TRAIN_TEMPLATES)  # every template in use
    assert max(templates.values()) < 2 * min(templates.values())


@pytest.fixture(scope="module")
def stamps() -> list[str]:
    return [r.key for r in read_tuxpaint(flatten=False)]


def test_tuxpaint_parts_split_the_stamps(stamps: list[str]) -> None:
    train = [r.key for r in read_tuxpaint(part="train", flatten=False)]
    test = [r.key for r in read_tuxpaint(part="test", flatten=False)]
    assert sorted(train + test) == sorted(stamps) and not set(train) & set(test)
    share = 100 * len(test) / len(stamps)
    assert abs(share - TUXPAINT_TEST_PERCENT) < 5, share
    with pytest.raises(SourceError, match="unknown tuxpaint part 'dev'"):
        list(read_tuxpaint(part="dev"))


def test_demo_mix_interleaves_and_never_reads_held_out_data(stamps: list[str]) -> None:
    records = list(open_source("demo-mix:synthetic=64,synthetic_test=16,fashion=300,seed=1"))
    kinds = [r.key.split("/")[0] if "/" in r.key else "synthetic" for r in records]
    counts = Counter(kinds)
    held_out = {f"tuxpaint/{k}" for k in stamps} - {
        f"tuxpaint/{r.key}" for r in read_tuxpaint(part="train", flatten=False)
    }
    assert counts["synthetic"] == 80 and counts["fashion-mnist"] == 300
    assert counts["tuxpaint"] == len(stamps) - len(held_out)
    assert len({r.key for r in records}) == len(records)
    assert all(r.key.startswith("fashion-mnist/train/") for r in records if "fashion" in r.key)
    assert not {r.key for r in records} & held_out
    assert {r.split for r in records if kinds[records.index(r)] != "synthetic"} == {"train"}
    tenth = len(records) // 10
    for start in range(0, len(records) - tenth + 1, tenth):  # every tenth has the same mix
        window = Counter(kinds[start : start + tenth])
        for kind, total in counts.items():
            assert abs(window[kind] / tenth - total / len(records)) < 0.03, (start, kind)
    with pytest.raises(SourceError, match="unknown demo-mix option"):
        open_source("demo-mix:fashoin=3")


def test_requirements_name_the_missing_package(tmp_path: Path) -> None:
    assert source_requirements("synthetic:train=3") == []
    assert len(source_requirements("demo-mix")) == 2
    assert len(source_requirements("demo-mix:fashion=0,tuxpaint=0")) == 0
    for check in source_requirements("demo-mix"):
        check()  # both installed here
    with pytest.raises(MissingDatasetError, match="apt-get install dataset-fashion-mnist"):
        list(open_source("demo-mix", fashion_root=str(tmp_path)))
