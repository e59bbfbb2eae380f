"""Flat MLflow metric names for evaluation records: the one naming scheme every caller logs.

``eval/<dataset>/<task>/<path>``: the pretrain flow, the nightly evaluation, ``clipops
register`` and the DVC metrics file (``flows.export``) all use :func:`eval_metrics`, so a run
never carries the same number under two names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

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


def eval_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Every finite scalar of every record's ``metrics`` as ``eval/<dataset>/<task>/<path>``."""
    out: dict[str, float] = {}
    for r in records:
        for path, value in _leaves((), r["metrics"]):
            out[metric_key("eval", str(r["dataset"]), str(r["task"]), *path)] = value
    return out
