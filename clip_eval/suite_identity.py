"""Which suite an evaluation ran: rebuilt from its records, and a fingerprint to compare by.

Every record of :func:`clip_eval.suite.run_suite` names its dataset, dataset options, task
and complete task options, so a ``results.jsonl`` is enough to run the same suite again
(:func:`suite_from_records`) and to tell whether two evaluations ran the same one
(:func:`suite_fingerprint`: a hash of what decides the results, not of the file's layout,
comments or batch size). The registry records the fingerprint with each model version and
the nightly evaluation re-runs a model's own suite.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from clip_eval.suite import Suite, SuiteError, parse_suite


def _canonical(dataset: str, task: str, options: Any, dataset_options: Any) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "task": task,
        "options": dict(options or {}),
        "dataset_options": dict(dataset_options or {}),
    }


def suite_fingerprint(suite: Suite) -> str:
    """16 hex digits identifying the suite's tasks (datasets, options), in order."""
    tasks = [_canonical(t.dataset, t.task, t.options, t.dataset_options) for t in suite.tasks]
    text = json.dumps(tasks, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def suite_from_records(records: Sequence[Mapping[str, Any]]) -> Suite:
    """The suite that produced ``records`` (one record per task, in suite order)."""
    if not records:
        raise SuiteError("no evaluation records: the suite cannot be rebuilt")
    tasks = []
    for i, r in enumerate(records):
        try:
            tasks.append(_canonical(r["dataset"], r["task"], r["options"], r["dataset_options"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SuiteError(f"record {i} does not name its task ({exc})") from exc
    names = {str(r.get("suite", "suite")) for r in records}
    return parse_suite({"name": names.pop() if len(names) == 1 else "suite", "tasks": tasks})
