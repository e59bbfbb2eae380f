"""Reports from records alone (no model): summary table, effective robustness, plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from clip_eval.report import (
    effective_robustness_table,
    read_jsonl,
    summary_markdown,
    write_report,
)


def _record(model: str, task: str, metrics: dict[str, Any], dataset: str = "d") -> dict[str, Any]:
    return {
        "model": model,
        "checkpoint_sha256": model * 8,
        "dataset": dataset,
        "task": task,
        "metrics": metrics,
        "classnames": ["a", "b"],
        "templates": [],
        "timing": {"seconds": 1.0},
    }


def _records() -> list[dict[str, Any]]:
    ens = {"bare_top1": 0.3, "single_top1": 0.4, "ensemble_top1": 0.5}
    few = {"ks": [1, 2, 4], "mean_top1": [0.2, 0.4, 0.6], "std_top1": [0.01, 0.02, 0.0]}
    few |= {"zero_shot_top1": 0.5, "effective_data_efficiency": 2.83}
    out = []
    for model, iid, shift in (("m1", 0.5, 0.3), ("m2", 0.7, 0.4), ("m3", 0.9, 0.8)):
        out.append(_record(model, "zero_shot", {"top1": iid, "chance": 0.5, "ensembling": ens}))
        out.append(_record(model, "linear_probe", {"top1": 0.8, "C": 1.0, "train_examples": 9}))
        zs = {"id_top1": iid, "shift_top1": shift, "relative_drop": 0.1}
        out.append(_record(model, "robustness", {"zero_shot": zs}, dataset="d-shift"))
    out.append(_record("m1", "few_shot", few))
    return out


def test_summary_and_effective_robustness() -> None:
    records = _records()
    table = effective_robustness_table(records)
    assert set(table) == {("d-shift", "m1"), ("d-shift", "m2"), ("d-shift", "m3")}
    assert table[("d-shift", "m3")] > 0 > table[("d-shift", "m2")]  # m3 lies above the trend
    text = summary_markdown(records)
    rows = [line for line in text.splitlines() if line.startswith(("| m1 ", "| m2 ", "| m3 "))]
    assert len(rows) == len(records)
    assert "matched at k=2.83" in text and "Effective robustness" in text
    assert effective_robustness_table(records[:3]) == {}  # one model: no trend


def test_every_accuracy_has_its_chance_level_beside_it() -> None:
    retrieval: dict[str, Any] = {
        "image_to_text_R@1": 0.2,
        "image_to_text_R@5": 0.5,
        "text_to_image_R@1": 0.1,
    }
    retrieval |= {"images": 50, "captions": 100}
    retrieval["chance"] = {"image_to_text_R@1": 0.04, "image_to_text_R@5": 0.19}
    retrieval["chance"] |= {"text_to_image_R@1": 0.02}
    records = [*_records(), _record("m1", "retrieval", retrieval)]
    text = summary_markdown(records)
    assert "| result (%) | chance (%) | seconds |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| m1 ", "| m2 ", "| m3 "))]
    assert len(rows) == len(records)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[2] == "retrieval":
            assert cells[4] == "R@1 4.0, R@5 19.0; text->image R@1 2.0", cells
            assert "image_to_text_R@5 50.0" in cells[3] and "chance" not in cells[3]
        else:
            assert cells[4] == "50.0", cells  # two classes


def test_write_report_with_and_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _records()
    pytest.importorskip("matplotlib")
    written = write_report(records, tmp_path / "a")
    names = sorted(p.name for p in written["plots"])
    assert names == ["ensembling.png", "few_shot.png", "zeroshot_vs_linear_probe.png"]
    assert written["plots_error"] is None
    assert read_jsonl(written["results"]) == records
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    without = write_report(records, tmp_path / "b")
    assert without["plots"] == [] and "matplotlib" in without["plots_error"]
    assert (tmp_path / "b" / "summary.md").is_file()
