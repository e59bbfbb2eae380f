"""Parse and validate a scoring request for the served CLIP model (pure: no MLflow, no torch).

A request is a table (a pandas DataFrame, as MLflow's scoring server builds it from
``dataframe_split`` / ``dataframe_records`` JSON) with an ``image`` column and/or a ``text``
column, plus params:

- ``task``: ``"embed"`` (default) or ``"zero_shot"``;
- ``labels``: candidate class names (zero_shot only, required, non-empty, distinct);
- ``templates``: prompt templates containing ``{}`` (zero_shot only; default
  ``["a photo of a {}."]``).

At most ``MAX_ROWS`` rows, ``MAX_LABELS`` labels and ``MAX_TEMPLATES`` templates per request
(the scoring server also caps the body's size: :mod:`clip_registry.serving`).

An image cell is the encoded file (PNG, JPEG, ...) as raw ``bytes`` or as a base64 string
(the only way to carry bytes in JSON; a ``data:image/...;base64,`` URL works too). Every
problem raises :class:`RequestError` with a one-line message naming the row or param at fault;
its :attr:`RequestError.public` form names only positions and field names (no cell values,
labels or templates), and is what the scoring server answers with (:mod:`clip_registry.serving`).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TASKS = ("embed", "zero_shot")
IMAGE_COLUMN = "image"
TEXT_COLUMN = "text"
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
MAX_LABELS = 1000
MAX_TEMPLATES = 100
MAX_ROWS = 10_000


class RequestError(ValueError):
    """A malformed scoring request (the server answers it with HTTP 400).

    ``str(exc)`` may quote the offending values (for in-process callers); ``exc.public`` is a
    one-line reason that names the row, column or param at fault by position or field name
    only, and is the only part a client sees. ``public`` defaults to the message, so a message
    without a separate ``public`` must not contain request data.
    """

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = message if public is None else public


@dataclass(frozen=True)
class ClipRequest:
    """A validated request: per row an encoded image and/or a text, and the task's params."""

    task: str
    images: tuple[bytes | None, ...]
    texts: tuple[str | None, ...]
    labels: tuple[str, ...] = ()
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    @property
    def rows(self) -> int:
        """Number of input rows."""
        return len(self.images)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def decode_image_cell(value: Any, row: int) -> bytes | None:
    """An image cell as bytes: raw bytes pass, a string must be valid base64; None if empty."""
    if _missing(value):
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str):
        if value.startswith("data:") and ";base64," in value[:100]:  # a data URL
            value = value.split(",", 1)[1]
        try:
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(
                f"row {row}: column 'image' is not valid base64 ({exc})",
                f"row {row}: column 'image' is not valid base64",
            ) from exc
    else:
        raise RequestError(
            f"row {row}: column 'image' must be bytes or a base64 string, "
            f"got {type(value).__name__}"
        )
    if not data:
        raise RequestError(f"row {row}: column 'image' is empty")
    return data


def _text_cell(value: Any, row: int) -> str | None:
    if _missing(value):
        return None
    if not isinstance(value, str):
        raise RequestError(f"row {row}: column 'text' must be a string, got {type(value).__name__}")
    return value


def _string_list(params: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    raw = params.get(key)
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if hasattr(raw, "tolist"):  # numpy arrays from MLflow's param enforcement
        raw = raw.tolist()
    if not isinstance(raw, Sequence) or not all(isinstance(x, str) for x in raw):
        raise RequestError(f"params.{key} must be a list of strings")
    return tuple(raw)


def _repeats(items: Sequence[str]) -> list[int]:
    """Positions of the items equal to an earlier one."""
    seen: set[str] = set()
    out = []
    for i, x in enumerate(items):
        if x in seen:
            out.append(i)
        seen.add(x)
    return out


def _zero_shot_params(params: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    labels = _string_list(params, "labels") or ()
    labels = tuple(label.strip() for label in labels)
    if not labels or not all(labels):
        raise RequestError(
            "task zero_shot needs params.labels: a non-empty list of non-blank class names"
        )
    if len(labels) > MAX_LABELS:
        raise RequestError(f"params.labels has {len(labels)} entries; at most {MAX_LABELS}")
    again = _repeats(labels)
    if again:
        raise RequestError(
            f"params.labels has duplicates: {sorted({labels[i] for i in again})}",
            f"params.labels has duplicates at positions {again[:10]}",
        )
    templates = _string_list(params, "templates") or DEFAULT_TEMPLATES
    if len(templates) > MAX_TEMPLATES:
        raise RequestError(
            f"params.templates has {len(templates)} entries; at most {MAX_TEMPLATES}"
        )
    bad = [i for i, t in enumerate(templates) if t.count("{}") != 1]
    if bad:
        rule = "must each contain '{}' exactly once"
        raise RequestError(
            f"params.templates {rule}: {[templates[i] for i in bad]}",
            f"params.templates at positions {bad[:10]} {rule}",
        )
    return labels, templates


def parse_request(
    columns: Mapping[str, Sequence[Any]], params: Mapping[str, Any] | None
) -> ClipRequest:
    """Validate a request given as ``column name -> cells`` and params; see the module doc."""
    params = dict(params or {})
    task = params.get("task") or "embed"
    if task not in TASKS:
        message = f"params.task must be one of {list(TASKS)}"
        raise RequestError(f"{message}, got {task!r}", message)
    unknown = sorted(set(columns) - {IMAGE_COLUMN, TEXT_COLUMN})
    if unknown:
        where = [i for i, c in enumerate(columns) if c not in (IMAGE_COLUMN, TEXT_COLUMN)]
        raise RequestError(
            f"unknown input columns {unknown}; expected 'image' and/or 'text'",
            f"unknown input columns at positions {where[:10]}; expected 'image' and/or 'text'",
        )
    if IMAGE_COLUMN not in columns and TEXT_COLUMN not in columns:
        raise RequestError("the input needs an 'image' column (base64) and/or a 'text' column")
    n = len(next(iter(columns.values())))
    if n == 0:
        raise RequestError("the input has no rows")
    if n > MAX_ROWS:
        raise RequestError(f"the input has {n} rows; at most {MAX_ROWS} per request")
    image_cells = columns.get(IMAGE_COLUMN, [None] * n)
    text_cells = columns.get(TEXT_COLUMN, [None] * n)
    images = tuple(decode_image_cell(v, i) for i, v in enumerate(image_cells))
    texts = tuple(_text_cell(v, i) for i, v in enumerate(text_cells))
    if task == "embed":
        empty = [i for i in range(n) if images[i] is None and texts[i] is None]
        if empty:
            raise RequestError(f"rows {empty[:10]} have neither an image nor a text")
        return ClipRequest(task, images, texts)
    if TEXT_COLUMN in columns and any(t is not None for t in texts):
        raise RequestError(
            "task zero_shot classifies images: send an 'image' column only "
            "(class names go in params.labels)"
        )
    missing = [i for i in range(n) if images[i] is None]
    if missing:
        raise RequestError(f"task zero_shot: rows {missing[:10]} have no image")
    labels, templates = _zero_shot_params(params)
    return ClipRequest(task, images, texts, labels, templates)
