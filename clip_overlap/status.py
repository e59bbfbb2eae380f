"""What an overlap figure may be published as: the status of each dataset's detection (pure).

A near-duplicate candidate counts as overlap (``n_overlap``, ``contamination`` and the
statistics built on them) only when the detection behind it is trustworthy:

* ``calibrated``: the threshold was measured against planted copies in the shards (real
  positives and real negatives, ``calibration: planted-in-shards``) and reaches the target
  precision there;
* ``verified``: each candidate pair was re-scored by aligned pixel comparison
  (:mod:`clip_overlap.verify`), the threshold calibrated on simulated copies;
* ``unverified: ...``: neither (a cosine threshold from simulated copies only, whose
  "negatives" are the candidates themselves, so it lets through up to ``1 - min_precision``
  of false positives by construction; or planted copies the threshold does not reach the
  target precision on). The candidates above the threshold are reported as
  ``unverified_candidates`` and never counted: only exact (byte-identical) duplicates are.

:func:`published` reads a record of any ``overlap.json`` (this format, or one written before
the status existed, whose ``contamination`` of a cosine/simulated analysis included its
unverified candidates) as the numbers the flows' table and the registry may show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CALIBRATED = "calibrated"
VERIFIED = "verified"
UNVERIFIED = "unverified: no calibrated detector"
MIXED = "mixed (see each dataset's status)"


def dataset_status(
    calibration: str, score: str, precision: float | None, min_precision: float
) -> str:
    """The status of one dataset's detection (see the module docstring): ``calibrated``
    first (measured on planted copies), then ``verified``, else ``unverified: ...``.

    ``calibration`` is ``planted-in-shards`` or ``simulated``, ``score`` ``verified`` or
    ``cosine``; ``precision`` is the threshold's precision on the planted ground truth
    (``None``: nothing above the threshold).
    """
    planted = calibration == "planted-in-shards"
    if planted and (precision is None or precision >= min_precision):
        return CALIBRATED
    if score == VERIFIED:
        return VERIFIED
    if planted:
        return f"unverified: precision {precision:.2f} < {min_precision:g} on planted copies"
    return UNVERIFIED


def counts_as_contamination(status: str) -> bool:
    """Whether candidates of a detection with this status count as overlap."""
    return not status.startswith("unverified")


def report_status(statuses: Iterable[str]) -> str:
    """One status for a report: its datasets' common status, else :data:`MIXED`."""
    distinct = set(statuses)
    if len(distinct) == 1:
        return distinct.pop()
    return MIXED if distinct else UNVERIFIED


@dataclass(frozen=True)
class Published:
    """The figures of one dataset that may be shown as contamination, and its status.

    ``status`` is ``None`` for a record that says nothing about its detection (not an
    ``overlap.json`` of this project): its figures are taken as they are. ``split_stats``:
    whether the record's Clean/Overlap statistics (acc_clean, p-values) are of the counted
    overlaps (not for a record written before the status existed that counted unverified
    candidates).
    """

    status: str | None
    n_overlap: int | None
    contamination: float | None
    all_minus_clean: float | None
    unverified_candidates: int
    split_stats: bool = True


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def published(record: Mapping[str, Any]) -> Published:
    """The publishable figures of a per-dataset record of an ``overlap.json``.

    A record with a ``status`` (this format) already counts only trustworthy overlaps. A
    record without one but with ``score`` and ``calibration`` (written before the status
    existed) gets the status they imply (at precision 0.95); if that is unverified (e.g.
    ``score: cosine``, ``calibration: simulated``) its ``contamination`` counted unverified
    candidates: only its exact duplicates are kept, All - Clean (measured on that split) is
    dropped. Any other record's figures are taken as they are.
    """
    n_overlap = _count(record.get("n_overlap"))
    contamination = _number(record.get("contamination"))
    all_minus_clean = _number(record.get("all_minus_clean"))
    status = record.get("status")
    if isinstance(status, str):
        candidates = _count(record.get("unverified_candidates")) or 0
        return Published(status, n_overlap, contamination, all_minus_clean, candidates)
    calibration, score = record.get("calibration"), record.get("score")
    if score not in ("cosine", VERIFIED) or not isinstance(calibration, str):
        return Published(None, n_overlap, contamination, all_minus_clean, 0)
    status = dataset_status(calibration, str(score), _number(record.get("precision")), 0.95)
    if counts_as_contamination(status):
        return Published(status, n_overlap, contamination, all_minus_clean, 0)
    exact = _count(record.get("exact_duplicates")) or 0
    n_all = _count(record.get("n_all"))
    candidates = max((n_overlap or 0) - exact, 0)
    fraction = exact / n_all if n_all else None
    return Published(status, exact, fraction, None, candidates, split_stats=False)
