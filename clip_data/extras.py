"""Extra metadata of accepted rows as typed Parquet columns.

Sources attach free-form metadata to each record (``RawRecord.extra``: the CSV's other
columns, a WebDataset sample's ``.json``, a corpus's attributes). Shards store it as
columns, so it can be filtered and read without parsing JSON:

* one column ``extra.<key>`` per key of the *extra schema*, typed by its values: ``int64``
  (ints that fit), ``float64`` (finite floats), ``bool``, ``string``, or ``json`` (a string
  column holding JSON text: lists, objects, ``null`` values, and keys whose values mix types);
* one string column ``extra_json``: a JSON object (sorted keys) of whatever the typed columns
  cannot hold for that row, ``null`` when there is nothing left over.

The rule: shards stream, so the extra schema is fixed before the first shard is written. It
is inferred from the rows of the first row group (at most ``ShardConfig.row_group_rows``
accepted rows): every key seen there gets a column, of the one type all its non-null values
share there (``json`` when they differ, or when all are null). A later row's key that is not in
the schema, or whose value does not fit the column type (``"n/a"`` in an ``int64`` column, a
``null``), goes to ``extra_json``. A typed cell is ``null`` when the row lacks the key. The
inference depends only on the rows and the configuration, so re-running an ingest gives the
same schema. The schema is recorded in the manifest (``extra_columns``: key -> type) and on
each Parquet field (metadata ``clipops.extra_type``).

Reading back (:func:`merge_extra`) gives exactly the dict that was written (JSON values).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

__all__ = [
    "EXTRA_JSON",
    "EXTRA_PREFIX",
    "EXTRA_TYPES",
    "extra_field",
    "extra_types_of",
    "infer_extra_types",
    "merge_extra",
    "split_extra",
    "to_json",
]

#: Prefix of the typed extra columns.
EXTRA_PREFIX = "extra."
#: The column of leftover extra metadata (JSON object text, or null).
EXTRA_JSON = "extra_json"
#: Field metadata key naming the extra type of an ``extra.<key>`` column.
TYPE_KEY = b"clipops.extra_type"

#: Extra column types and their Arrow types.
EXTRA_TYPES: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
    "json": pa.string(),
}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def to_json(value: Any, what: str) -> str:
    """Compact JSON with sorted keys, valid UTF-8 (lone surrogates escaped).

    Raises ``ValueError`` naming ``what`` for a value JSON cannot represent.
    """
    try:
        text = json.dumps(
            value, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from exc
    if not _utf8_ok(text):  # e.g. undecodable CSV bytes kept as surrogate escapes
        text = json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return text


def _utf8_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    """The extra type a single non-null value would get on its own."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if _INT64_MIN <= value <= _INT64_MAX else "json"
    if isinstance(value, float):
        return "float64" if math.isfinite(value) else "json"
    if isinstance(value, str):
        return "string" if _utf8_ok(value) else "json"
    return "json"


def infer_extra_types(extras: Iterable[Mapping[Any, Any]]) -> dict[str, str]:
    """The extra schema (key -> type, sorted by key) of a sample of extra dicts.

    A key whose non-null values all have one type gets that type; mixed types, or only
    nulls, give ``json``. Non-string keys are left out (they go to ``extra_json``).
    """
    kinds: dict[str, set[str]] = {}
    for extra in extras:
        for key, value in extra.items():
            if not isinstance(key, str):
                continue
            seen = kinds.setdefault(key, set())
            if value is not None:
                seen.add(_kind(value))
    return {key: next(iter(k)) if len(k) == 1 else "json" for key, k in sorted(kinds.items())}


def _fits(value: Any, kind: str) -> bool:
    if kind == "json":
        return True
    return value is not None and _kind(value) == kind


def split_extra(
    extra: Mapping[Any, Any], types: Mapping[str, str], what: str
) -> tuple[list[Any], str | None]:
    """One row's extra dict as (typed column values in ``types`` order, leftover JSON).

    A typed value is ``None`` where the row lacks the key; ``json`` columns hold JSON text.
    Raises ``ValueError`` (naming ``what``) for a value JSON cannot represent.
    """
    values: list[Any] = []
    for key, kind in types.items():
        if key not in extra or not _fits(extra[key], kind):
            values.append(None)
        elif kind == "json":
            values.append(to_json(extra[key], f"{what}[{key!r}]"))
        else:
            values.append(extra[key])
    rest = {k: v for k, v in extra.items() if not (k in types and _fits(v, types[k]))}
    return values, (to_json(rest, what) if rest else None)


def merge_extra(typed: Sequence[tuple[str, str, Any]], leftover: str | None) -> dict[str, Any]:
    """Rebuild a row's extra dict from ``(key, type, cell)`` triples and its leftover JSON."""
    extra: dict[str, Any] = {}
    for key, kind, cell in typed:
        if cell is not None:
            extra[key] = json.loads(cell) if kind == "json" else cell
    if leftover is not None:
        extra.update(json.loads(leftover))
    return dict(sorted(extra.items()))


def extra_field(key: str, kind: str) -> pa.Field:
    """The nullable Arrow field of extra key ``key`` with type ``kind``."""
    return pa.field(
        EXTRA_PREFIX + key, EXTRA_TYPES[kind], nullable=True, metadata={TYPE_KEY: kind.encode()}
    )


def extra_types_of(schema: pa.Schema) -> list[tuple[str, str, str]]:
    """``(column name, key, type)`` of the typed extra columns of a shard schema."""
    by_arrow = {"int64": "int64", "double": "float64", "bool": "bool", "string": "string"}
    found = []
    for field in schema:
        if field.name.startswith(EXTRA_PREFIX):
            kind = (field.metadata or {}).get(TYPE_KEY, b"").decode()
            if kind not in EXTRA_TYPES:  # written by another tool: go by the Arrow type
                kind = by_arrow.get(str(field.type), "")
            if kind:
                found.append((field.name, field.name[len(EXTRA_PREFIX) :], kind))
    return found
