"""Headline numbers for a model version: evaluation records and the overlap report (pure).

Metric keys are ``TASK/DATASET/METRIC`` with stable names, e.g. ``zero_shot/cifar10/top1``,
``linear_probe/cifar10/top1``, ``robustness/synthetic-shifted/shift_top1``,
``retrieval/flickr/image_to_text_R1``, ``few_shot/cifar10/top1_k16``, plus the means over
datasets ``zero_shot/mean/top1`` and ``linear_probe/mean/top1`` (the default primary metric of
the promotion rule is ``zero_shot/mean/top1``). Values are fractions in [0, 1]. Keys hold only
the characters MLflow accepts in metric and tag names (a dataset URI's other characters
become ``_``), so they can be logged as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

MEAN = "mean"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_safe(name: str) -> str:
    """``name`` with every character MLflow refuses in metric/tag keys replaced by ``_``."""
    return _UNSAFE.sub("_", name)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    task, dataset = str(record.get("task")), str(record.get("dataset"))
    m = record.get("metrics")
    if not isinstance(m, Mapping):
        return {}
    found: dict[str, Any] = {}
    if task in ("zero_shot", "linear_probe"):
        found["top1"] = m.get("top1")
    elif task == "few_shot":
        ks, top = m.get("ks"), m.get("mean_top1")
        if isinstance(ks, list) and isinstance(top, list) and ks and len(ks) == len(top):
            found[f"top1_k{ks[-1]}"] = top[-1]
    elif task == "retrieval":
        found.update({k.replace("_R@", "_R"): v for k, v in m.items() if k.endswith("_R@1")})
    elif task == "robustness":
        zs = m.get("zero_shot")
        if isinstance(zs, Mapping):
            found["id_top1"], found["shift_top1"] = zs.get("id_top1"), zs.get("shift_top1")
    out = {}
    for name, value in found.items():
        number = _number(value)
        if number is not None:
            out[mlflow_safe(f"{task}/{dataset}/{name}")] = number
    return out


def headline_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """``TASK/DATASET/METRIC -> value`` of the records of ``clipops eval``, plus the means."""
    out: dict[str, float] = {}
    for record in records:
        out.update(_record_metrics(record))
    for task in ("zero_shot", "linear_probe"):
        values = [v for k, v in out.items() if k.startswith(f"{task}/") and k.endswith("/top1")]
        if values:
            out[f"{task}/{MEAN}/top1"] = sum(values) / len(values)
    return dict(sorted(out.items()))


def _dataset_entries(report: Any) -> dict[str, Mapping[str, Any]]:
    """Per-dataset dicts of an overlap report, in any of the shapes it may take."""
    if isinstance(report, Mapping) and "datasets" in report:
        report = report["datasets"]
    if isinstance(report, list):
        return {
            str(e.get("dataset", e.get("name", i))): e
            for i, e in enumerate(report)
            if isinstance(e, Mapping)
        }
    if isinstance(report, Mapping):
        out = {}
        for name, raw in report.items():
            entry = raw
            if isinstance(raw, Mapping) and isinstance(raw.get("stats"), Mapping):
                entry = raw["stats"]
            if isinstance(entry, Mapping) and "contamination" in entry:
                out[str(name)] = entry
        return out
    return {}


def overlap_summary(report: Any) -> dict[str, float]:
    """``DATASET/contamination`` and ``DATASET/all_minus_clean`` (plus ``max/contamination``)
    from an ``overlap.json``; fields that are missing or not numbers are left out.

    Only the figures :func:`clip_overlap.status.published` allows: never the candidates of
    an uncalibrated, unverified detector (a dataset of such a report contributes its exact
    duplicates only; see :func:`overlap_statuses` for the status to show beside them)."""
    from clip_overlap.status import published

    out: dict[str, float] = {}
    for dataset, entry in _dataset_entries(report).items():
        shown = published(entry)
        for field, number in (
            ("contamination", shown.contamination),
            ("all_minus_clean", shown.all_minus_clean),
        ):
            if number is not None:
                out[mlflow_safe(f"{dataset}/{field}")] = number
    contamination = [v for k, v in out.items() if k.endswith("/contamination")]
    if contamination:
        out["max/contamination"] = max(contamination)
    return dict(sorted(out.items()))


def overlap_statuses(report: Any) -> dict[str, str]:
    """``status`` (the report's) and ``DATASET/status`` (:mod:`clip_overlap.status`:
    ``calibrated``, ``verified`` or ``unverified: ...``) of the datasets of an
    ``overlap.json`` that state one or whose format implies one; ``{}`` when none does."""
    from clip_overlap.status import published, report_status

    out: dict[str, str] = {}
    for dataset, entry in _dataset_entries(report).items():
        status = published(entry).status
        if status is not None:
            out[mlflow_safe(f"{dataset}/status")] = status
    if out:
        stated = report.get("status") if isinstance(report, Mapping) else None
        out["status"] = stated if isinstance(stated, str) else report_status(out.values())
    return dict(sorted(out.items()))
