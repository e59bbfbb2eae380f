"""Flat MLflow metric names for evaluation records: the one naming scheme every caller logs.

``transfer/<dataset>/<task>/<path>``: the pretrain flow, the nightly evaluation and ``clipops
register`` all use :func:`eval_metrics`, so a run never carries the same number under two
names. The root sorts after ``train/``: the MLflow UI
orders chart sections alphabetically, so the training curves come first (docs/guides/mlflow.md
has the table of every name). Two record paths that would map to one name are an error, not
a silent overwrite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

EVAL_METRIC_ROOT = "transfer"
_METRIC_CHARS = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_key(*parts: str) -> str:
    """A valid MLflow metric name from path parts (other characters become ``_``)."""
    return "/".join(_METRIC_CHARS.sub("_", p) for p in parts if p)


def _leaves(prefix: tuple[str, ...], value: Any) -> list[tuple[tuple[str, ...], float]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [] if not math.isfinite(float(value)) else [(prefix, float(value))]
    if isinstance(value, Mapping):
        out: list[tuple[tuple[str, ...], float]] = []
        for key in sorted(value):
            out += _leaves((*prefix, str(key)), value[key])
        return out
    return []  # lists (few-shot curves), strings, None: not scalar metrics


def c_label(c: float) -> str:
    """A probe's inverse regularisation strength as a name part: ``C_1e6``, ``C_1e-6``,
    ``C_316.228`` (6 significant digits, no ``+``, no zero-padded exponent)."""
    mantissa, _, exponent = f"{c:.6g}".partition("e")
    return f"C_{mantissa}" + (f"e{int(exponent)}" if exponent else "")


def eval_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Every finite scalar of every record's ``metrics`` as
    ``transfer/<dataset>/<task>/<path>``; raises ``ValueError`` when two paths share a name."""
    out: dict[str, float] = {}
    origin: dict[str, tuple[int, str]] = {}
    for i, r in enumerate(records):
        for path, value in _leaves((), r["metrics"]):
            full = "/".join((str(r["dataset"]), str(r["task"]), *path))
            key = metric_key(EVAL_METRIC_ROOT, full)
            if key in origin:
                j, other = origin[key]
                raise ValueError(
                    f"metric name {key!r} for both record {j} {other!r} and record {i} {full!r}"
                )
            out[key], origin[key] = value, (i, full)
    return out
