"""Suite parsing (strict keys), zero-shot records against a direct computation, feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import clip_core.probe
from clip_core import create_model
from clip_core.synthetic import class_prompts, generate
from clip_core.tokenizer import ClipTokenizer
from clip_core.transforms import EvalTransform
from clip_eval.datasets import load_dataset
from clip_eval.suite import (
    DEFAULT_SUITE,
    EvalModel,
    SuiteError,
    Task,
    load_suite,
    parse_suite,
    run_suite,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")
SMALL = {"n_train": 40, "n_test": 24}


@pytest.fixture(scope="module")
def tiny() -> EvalModel:
    torch.manual_seed(0)
    captions = [s.caption for s in generate(150, "train")]
    tok = ClipTokenizer.train(captions, 600, context_length=24)
    model = create_model("tiny-vit", text={"vocab_size": tok.vocab_size}).eval()
    return EvalModel(model, tok, "f" * 64, "tiny")


def _suite(*tasks: dict[str, Any]) -> dict[str, Any]:
    return {"name": "t", "tasks": list(tasks)}


def test_default_suite_parses_with_all_defaults() -> None:
    suite = load_suite("default")
    assert load_suite(DEFAULT_SUITE) == suite
    kinds = {t.task for t in suite.tasks}
    assert {"zero_shot", "linear_probe", "few_shot", "robustness"} <= kinds
    probe = next(t for t in suite.tasks if t.task == "linear_probe")
    assert isinstance(probe, Task) and probe.options["projected"] is False
    with pytest.raises(AttributeError):
        probe.task = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tasks": [], "extra": 1}, "unknown suite key"),
        ({"tasks": []}, "non-empty"),
        (_suite({"dataset": "x", "task": "zero_shot", "optoins": {}}), "unknown key"),
        (_suite({"dataset": "x", "task": "zeroshot"}), "unknown task"),
        (_suite({"dataset": "x", "task": "few_shot", "options": {"k": [1]}}), "unknown option"),
        (_suite({"dataset": "x", "task": "retrieval", "batch_size": 0}), "batch_size"),
        (_suite({"task": "retrieval"}), "'dataset'"),
        ([1, 2], "mapping"),
        (
            _suite(
                {"dataset": "x", "task": "zero_shot"},
                {"dataset": "y", "task": "zero_shot"},
                {"dataset": "x", "task": "zero_shot"},
            ),
            r"task 2 repeats task 0 \(dataset 'x', task 'zero_shot'\).*share names",
        ),
    ],
)
def test_strict_suite_keys(raw: Any, message: str) -> None:
    with pytest.raises(SuiteError, match=message):
        parse_suite(raw)


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("tasks: [\n")
    with pytest.raises(SuiteError, match="YAML"):
        load_suite(path)


def test_zero_shot_record_matches_direct_computation(tiny: EvalModel) -> None:
    suite = parse_suite(
        _suite(
            {
                "dataset": "synthetic-test",
                "task": "zero_shot",
                "dataset_options": SMALL,
                "batch_size": 7,
            }
        )
    )
    (record,) = run_suite(tiny, suite)
    ds = load_dataset("synthetic-test", **SMALL)
    transform = EvalTransform(tiny.model.config.vision.image_size)
    with torch.no_grad():
        images = torch.stack([transform(im) for im in ds.test.images])  # type: ignore[arg-type]
        feats = F.normalize(tiny.model.encode_image(images), dim=-1)  # [N, D]
        names = class_prompts("shape")
        assert tiny.tokenizer is not None
        per_class = []
        for name in names:
            emb = F.normalize(
                tiny.model.encode_text(tiny.tokenizer([t.format(name) for t in ds.templates])),
                dim=-1,
            )
            per_class.append(F.normalize(emb.mean(0), dim=-1))
        logits = feats @ torch.stack(per_class).T
    expected = (logits.argmax(-1) == torch.tensor(ds.test.labels)).float().mean().item()
    assert record["metrics"]["top1"] == pytest.approx(expected, abs=1e-6)
    gain = record["metrics"]["ensembling"]
    assert gain["ensemble_top1"] == record["metrics"]["top1"]
    assert {"bare_top1", "single_top1", "ensemble_vs_bare"} <= set(gain)
    assert record["templates"] == list(ds.templates) and record["classnames"] == names
    assert record["checkpoint_sha256"] == "f" * 64 and record["timing"]["seconds"] > 0


def test_feature_cache_is_reused(
    tiny: EvalModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = parse_suite(
        _suite(
            {
                "dataset": "synthetic-test",
                "task": "linear_probe",
                "dataset_options": SMALL,
                "options": {"refine_rounds": 0},
            }
        )
    )
    first = run_suite(tiny, suite, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 2 and all(f.name.startswith("f" * 16) for f in files)
    assert {f.name.rsplit("-", 1)[1] for f in files} == {"pre.npz"}
    mtimes = [f.stat().st_mtime_ns for f in files]

    def no_extraction(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("features were recomputed despite the cache")

    monkeypatch.setattr(clip_core.probe, "extract_features", no_extraction)
    second = run_suite(tiny, suite, cache_dir=tmp_path)
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.glob("*.npz"))] == mtimes
    assert second[0]["metrics"] == first[0]["metrics"]
    other = parse_suite(
        _suite(
            {
                "dataset": "synthetic-test",
                "task": "linear_probe",
                "dataset_options": SMALL,
                "options": {"projected": True},
            }
        )
    )
    with pytest.raises(AssertionError, match="recomputed"):  # other layer: a cache miss
        run_suite(tiny, other, cache_dir=tmp_path)


def test_retrieval_and_text_tasks_need_a_tokenizer(tiny: EvalModel) -> None:
    suite = parse_suite(
        _suite({"dataset": "synthetic-test", "task": "retrieval", "dataset_options": SMALL})
    )
    (record,) = run_suite(tiny, suite)
    m = record["metrics"]
    assert 0 <= m["image_to_text_R@1"] <= m["image_to_text_R@5"] <= m["image_to_text_R@10"] <= 1
    assert m["captions"] == SMALL["n_test"]
    blind = EvalModel(tiny.model, None, tiny.sha256, "blind")
    with pytest.raises(SuiteError, match="tokenizer"):
        run_suite(blind, suite)


def test_retrieval_on_tuxpaint_captions(tiny: EvalModel) -> None:
    suite = parse_suite(
        _suite({"dataset": "tuxpaint", "task": "retrieval", "dataset_options": {"limit": 40}})
    )
    (record,) = run_suite(tiny, suite)
    m = record["metrics"]
    assert m["captions"] == 40 and record["dataset"] == "tuxpaint"
    for direction in ("image_to_text", "text_to_image"):
        assert 0 <= m[f"{direction}_R@1"] <= m[f"{direction}_R@5"] <= m[f"{direction}_R@10"] <= 1


def test_openai_format_weights_with_and_without_tokenizer(tiny: EvalModel, tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    torch.save(tiny.model.state_dict(), weights)
    assert tiny.tokenizer is not None
    tiny.tokenizer.save(tmp_path / "merges.txt.gz")
    probe = parse_suite(
        _suite(
            {
                "dataset": "synthetic-test",
                "task": "linear_probe",
                "dataset_options": SMALL,
                "options": {"refine_rounds": 0},
            }
        )
    )
    (record,) = run_suite(weights, probe)  # image-only task: no tokenizer needed
    assert record["model"] == "model.pt" and len(record["checkpoint_sha256"]) == 64
    zero_shot = parse_suite(
        _suite({"dataset": "synthetic-test", "task": "zero_shot", "dataset_options": SMALL})
    )
    with pytest.raises(SuiteError, match="tokenizer"):
        run_suite(weights, zero_shot)
    (zs,) = run_suite(weights, zero_shot, tokenizer=tmp_path / "merges.txt.gz")
    (direct,) = run_suite(tiny, zero_shot)
    assert zs["metrics"]["top1"] == pytest.approx(direct["metrics"]["top1"])
