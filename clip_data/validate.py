"""Dataset-level validation of an ingest output with Great Expectations.

:func:`clip_data.checks.check_record` validates records one at a time *during* ingest; this
module re-validates a finished ingest output directory as a whole, after the fact (a shard may
have been rewritten, copied badly or produced by an older/buggy writer)::

    report = validate_dataset("data/train", ValidationConfig(max_caption_chars=1024))
    print(report.summary())          # lists failing expectations only
    # <dest>/validation.json holds the full result (GX result included)

``dest`` is a local directory or any fsspec URL: ``validate_dataset("s3://bucket/train")``
reads the shards with ranged reads and writes ``validation.json`` next to them (S3 settings
from ``storage_options`` or the usual ``AWS_*`` environment variables).

What is checked (thresholds come from :class:`ValidationConfig`, loadable from YAML/JSON):

* the metadata frame has exactly the expected columns, and every shard file has exactly the
  column names and types of :func:`~clip_data.shard_format.row_schema` for the manifest's
  ``extra_columns`` (the base columns, the typed ``extra.<key>`` columns, ``extra_json``);
* no nulls in key, caption and the image-derived columns; captions are valid UTF-8 and their
  length is within bounds; width/height and aspect ratio are within bounds; keys are unique;
  splits are in the allowed set;
* a deterministic, evenly spaced sample of rows has its image bytes decoded again
  (``decode_ok``: decodes, the decoded size equals the stored width/height and the bytes hash
  to the stored ``sha256``);
* the manifest agrees with the files: the accepted count and per-shard/per-split row counts
  equal the rows found, and every shard's SHA-256 equals the one in the manifest.

Memory: shards are read row group by row group, only the small metadata columns; the image
column is read only for row groups that hold a sampled row (one row group at a time, since
Parquet cannot read part of a row group's column). The metadata frame itself (one row per
accepted row, captions included) is held in memory, as GX's pandas engine needs.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeAlias

from clip_data.checks import CheckConfig
from clip_data.files import is_read_error, short_error
from clip_data.metadata import (
    FRAME_COLUMNS,
    Dataset,
    DatasetError,
    is_number,
    metadata_frame,
    open_dataset,
    read_frame,
)
from clip_data.records import SPLITS
from clip_data.shard_format import row_schema
from clip_data.shards import ROW_SCHEMA

# pandas ships no type stubs in this environment: frames are typed as Any (pandas.DataFrame at
# runtime) and pandas is imported via importlib so mypy does not look for its stubs.
_DataFrame: TypeAlias = Any

__all__ = [
    "FRAME_COLUMNS",
    "REPORT_NAME",
    "DatasetError",
    "ValidationConfig",
    "ValidationReport",
    "metadata_frame",
    "validate_dataset",
]

#: File written into the dataset directory by :func:`validate_dataset`.
REPORT_NAME = "validation.json"

_EXAMPLES = 5


_CHECK_DEFAULTS = CheckConfig()  # the ingest thresholds this validation re-checks


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of :func:`validate_dataset`.

    The caption, size and aspect defaults are those of the ingest checks
    (:class:`~clip_data.checks.CheckConfig`) and the allowed splits are
    :data:`~clip_data.records.SPLITS`, so a fresh ingest output validates with the defaults.

    Attributes:
        min_caption_chars / max_caption_chars: Caption length bounds, in characters.
        min_side / max_side: Bounds on image width and height, in pixels.
        max_aspect: Largest ``max(w, h) / min(w, h)``.
        allowed_splits: Split names a row may carry.
        sample_size: Rows whose image bytes are decoded again (evenly spaced over the
            dataset in row order, so deterministic); 0 disables the decode check.
        min_success_fraction: Fraction of rows each column expectation must hold for
            ("mostly" in GX terms); 1.0 means every row.
    """

    min_caption_chars: int = _CHECK_DEFAULTS.min_caption_chars
    max_caption_chars: int = _CHECK_DEFAULTS.max_caption_chars
    min_side: int = _CHECK_DEFAULTS.min_side
    max_side: int = _CHECK_DEFAULTS.max_side
    max_aspect: float = _CHECK_DEFAULTS.max_aspect
    allowed_splits: tuple[str, ...] = SPLITS
    sample_size: int = 256
    min_success_fraction: float = 1.0

    def __post_init__(self) -> None:
        """Validate the fields."""
        for name in ("min_caption_chars", "max_caption_chars", "min_side", "max_side"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError("min_caption_chars must be <= max_caption_chars")
        if self.min_side > self.max_side:
            raise ValueError("min_side must be <= max_side")
        if not _is_int(self.sample_size) or self.sample_size < 0:
            raise ValueError(f"sample_size must be an int >= 0, got {self.sample_size!r}")
        aspect = self.max_aspect
        if not is_number(aspect) or not math.isfinite(aspect) or aspect < 1.0:
            raise ValueError(f"max_aspect must be a finite number >= 1, got {aspect!r}")
        frac = self.min_success_fraction
        if not is_number(frac) or not 0.0 < frac <= 1.0:
            raise ValueError(f"min_success_fraction must be in (0, 1], got {frac!r}")
        splits = self.allowed_splits
        if (
            not isinstance(splits, tuple)
            or not splits
            or not all(isinstance(s, str) and s for s in splits)
        ):
            raise ValueError(
                f"allowed_splits must be a non-empty tuple of non-empty str, got {splits!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"validation config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"unknown validation config key(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        values = dict(data)
        if isinstance(values.get("allowed_splits"), list):
            values["allowed_splits"] = tuple(values["allowed_splits"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ValidationConfig:
        """Load from a ``.json`` file or a YAML file (any other suffix); empty YAML = defaults."""
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            from clip_core.yamlio import load_yaml

            try:
                data = load_yaml(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{p}: invalid YAML: {exc}") from exc
            if data is None:
                data = {}
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable mapping (``from_dict(to_dict())`` round-trips)."""
        data = asdict(self)
        data["allowed_splits"] = list(self.allowed_splits)
        return data


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of :func:`validate_dataset`.

    ``results`` has one entry per expectation (and per extra, non-GX check), each a dict with
    ``name``, ``column`` (``None`` for table-level checks), ``success``, ``unexpected_count``,
    ``unexpected_percent`` and ``examples`` (a few offending values).
    """

    success: bool
    dataset: str
    rows: int
    results: list[dict[str, Any]]

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The failing entries of :attr:`results`."""
        return [r for r in self.results if not r["success"]]

    def summary(self) -> str:
        """Short human-readable text; lists failing expectations only."""
        failures = self.failures
        head = (
            f"validation {'passed' if self.success else 'FAILED'}: {self.dataset} "
            f"({self.rows} rows, {len(self.results)} checks, {len(failures)} failed)"
        )
        lines = [head]
        for r in failures:
            where = f"({r['column']})" if r["column"] else ""
            count = r["unexpected_count"]
            what = ""
            if count is not None:
                pct = r["unexpected_percent"]
                what = f": {count} unexpected" + (f" ({pct:.3g}%)" if pct is not None else "")
            examples = ""
            if r["examples"]:
                examples = " e.g. " + ", ".join(_short(x) for x in r["examples"][:3])
            lines.append(f"  FAIL {r['name']}{where}{what}{examples}")
        return "\n".join(lines)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -------------------------------------------------------------------------- reading


def _entry(
    name: str,
    column: str | None,
    success: bool,
    *,
    unexpected_count: int | None = None,
    unexpected_percent: float | None = None,
    examples: list[Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "column": column,
        "success": bool(success),
        "unexpected_count": unexpected_count,
        "unexpected_percent": unexpected_percent,
        "examples": list(examples or [])[:_EXAMPLES],
    }


def _shard_sha256(dataset: Dataset, file: str) -> str | None:
    """The shard's SHA-256; ``None`` when it cannot be read (a mismatch, not an error)."""
    try:
        return dataset.sha256(file)
    except Exception as exc:
        if not is_read_error(exc):
            raise
        return None


def _extra_checks(dataset: Dataset, frame: _DataFrame) -> list[dict[str, Any]]:
    """Checks GX cannot express on the frame: the manifest and the shard files themselves."""
    manifest = dataset.manifest
    rows = len(frame)
    shards = manifest["shards"]
    problems: list[str] = []
    accepted = manifest["counts"].get("accepted")
    if accepted != rows:
        problems.append(f"manifest accepted={accepted!r} but {rows} rows found")
    bad_schema: list[str] = []
    bad_sha: list[str] = []
    extra_columns = manifest.get("extra_columns") or {}
    try:
        expected = row_schema(extra_columns)
    except (KeyError, TypeError, AttributeError):  # a tampered extra schema in the manifest
        expected = ROW_SCHEMA
        problems.append(f"manifest extra_columns={extra_columns!r} is not an extra schema")
    expected_names = expected.names
    expected_types = [f.type for f in expected]
    for shard in shards:
        pf = dataset.parquet(shard["file"])
        try:
            schema, found = pf.schema_arrow, pf.metadata.num_rows
            groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        finally:
            pf.close()
        if "row_groups" in shard and shard["row_groups"] != groups:  # what training plans on
            problems.append(
                f"{shard['file']}: manifest row_groups={shard['row_groups']!r}, found {groups}"
            )
        splits = shard.get("row_group_splits")
        if splits is not None and [sum(c.values()) for c in splits] != groups:  # resume plan
            problems.append(
                f"{shard['file']}: manifest row_group_splits={splits!r} do not add up to the "
                f"row groups {groups}"
            )
        if schema.names != expected_names or [f.type for f in schema] != expected_types:
            bad_schema.append(f"{shard['file']}: {schema.names}")
        if shard.get("rows") != found:
            problems.append(f"{shard['file']}: manifest rows={shard.get('rows')!r}, found {found}")
        if _shard_sha256(dataset, shard["file"]) != shard.get("sha256"):
            bad_sha.append(shard["file"])
    per_split = manifest["counts"].get("per_split")
    if isinstance(per_split, dict):
        found_splits = Counter(str(s) for s in frame["split"].dropna())
        if dict(found_splits) != {k: v for k, v in per_split.items() if v}:
            problems.append(f"manifest per_split={per_split} but found {dict(found_splits)}")
    return [
        _entry(
            "manifest_counts_match_rows",
            None,
            not problems,
            unexpected_count=len(problems),
            examples=problems,
        ),
        _entry(
            "shard_schema_matches",
            None,
            not bad_schema,
            unexpected_count=len(bad_schema),
            examples=bad_schema,
        ),
        _entry(
            "shard_sha256_matches_manifest",
            None,
            not bad_sha,
            unexpected_count=len(bad_sha),
            examples=bad_sha,
        ),
    ]


# -------------------------------------------------------------------------- GX


def _build_suite(gx: Any, config: ValidationConfig) -> Any:
    """The expectation suite over :func:`metadata_frame`'s columns (not yet in a context)."""
    e = gx.expectations
    mostly = float(config.min_success_fraction)
    suite = gx.ExpectationSuite(name="clipops_dataset")
    add = suite.add_expectation
    add(e.ExpectTableColumnsToMatchSet(column_set=list(FRAME_COLUMNS), exact_match=True))
    for column in ("key", "caption", "caption_chars", "caption_utf8_ok", "width", "height"):
        add(e.ExpectColumnValuesToNotBeNull(column=column, mostly=mostly))
    for column in ("aspect", "sha256", "split", "source"):
        add(e.ExpectColumnValuesToNotBeNull(column=column, mostly=mostly))
    add(e.ExpectColumnValuesToBeUnique(column="key", mostly=mostly))
    add(e.ExpectColumnValuesToBeInSet(column="caption_utf8_ok", value_set=[True], mostly=mostly))
    add(
        e.ExpectColumnValuesToBeBetween(
            column="caption_chars",
            min_value=config.min_caption_chars,
            max_value=config.max_caption_chars,
            mostly=mostly,
        )
    )
    for column in ("width", "height"):
        add(
            e.ExpectColumnValuesToBeBetween(
                column=column, min_value=config.min_side, max_value=config.max_side, mostly=mostly
            )
        )
    add(
        e.ExpectColumnValuesToBeBetween(
            column="aspect", min_value=1.0, max_value=float(config.max_aspect), mostly=mostly
        )
    )
    add(
        e.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(config.allowed_splits), mostly=mostly
        )
    )
    add(e.ExpectColumnValuesToBeInSet(column="decode_ok", value_set=[True], mostly=mostly))
    return suite


def _json_safe(value: Any) -> Any:  # noqa: PLR0911 - one return per kind of value
    """Replace NaN/inf with ``None`` and anything unserialisable with its ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    import numpy as np

    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if value is importlib.import_module("pandas").NA:
        return None
    return str(value)


def _gx_entry(result: Any) -> dict[str, Any]:
    cfg = result.expectation_config
    res = _json_safe(dict(result.result or {}))
    examples: list[Any] = res.get("partial_unexpected_list") or []
    if not examples and isinstance(res.get("details"), dict):
        mismatched = res["details"].get("mismatched")
        if mismatched:
            examples = [mismatched]
    return _entry(
        str(cfg.type),
        cfg.kwargs.get("column"),
        bool(result.success),
        unexpected_count=res.get("unexpected_count"),
        unexpected_percent=res.get("unexpected_percent"),
        examples=examples,
    )


def _run_gx(frame: _DataFrame, config: ValidationConfig) -> tuple[list[dict[str, Any]], Any]:
    """Run the suite on ``frame``; return report entries (suite order) and the GX result."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("clipops")
        .add_dataframe_asset("metadata")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(_build_suite(gx, config))
    order: dict[tuple[str, Any], int] = {}
    for i, exp in enumerate(suite.expectations):
        cfg = exp.configuration
        order[(str(cfg.type), cfg.kwargs.get("column"))] = i
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="clipops_dataset", data=batch, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
    entries = [_gx_entry(r) for r in result.results]
    entries.sort(key=lambda r: order.get((r["name"], r["column"]), len(order)))
    return entries, result


def _write_json(dataset: Dataset, name: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as ``name`` of the output: atomically (a local temporary file and a
    rename; one PUT on object storage, whose objects appear whole)."""
    text = json.dumps(_json_safe(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
    if dataset.fs is not None:
        try:
            dataset.fs.pipe_file(f"{dataset.root}/{name}", text.encode("utf-8"))
        except Exception as exc:
            if not is_read_error(exc):
                raise
            where = dataset.where(name)
            raise DatasetError(f"cannot write {where}: {short_error(exc)}") from None
        return
    path = Path(dataset.root) / name
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def validate_dataset(
    dest: str | os.PathLike[str],
    config: ValidationConfig = ValidationConfig(),  # frozen, so a shared default is safe
    *,
    storage_options: dict[str, Any] | None = None,
) -> ValidationReport:
    """Validate the ingest output at ``dest``; write ``<dest>/validation.json``.

    ``dest`` is a local directory or any fsspec URL such as ``s3://bucket/prefix``
    (``storage_options``: the filesystem's options, e.g. endpoint and credentials; S3 also
    reads the usual ``AWS_*`` environment variables).

    Returns a :class:`ValidationReport` whose ``success`` is ``True`` only when every GX
    expectation and every extra check (manifest counts, shard schema, shard SHA-256) holds.

    Raises:
        DatasetError: ``dest`` is not an ingest output, a listed shard cannot be read, or the
            storage cannot be reached (one line, naming the cause).
        TypeError: ``config`` is not a :class:`ValidationConfig`.
    """
    if not isinstance(config, ValidationConfig):
        raise TypeError(f"config must be a ValidationConfig, got {type(config).__name__}")
    dataset = open_dataset(dest, storage_options)
    frame = read_frame(dataset, config.sample_size)
    entries, result = _run_gx(frame, config)
    try:
        extra = _extra_checks(dataset, frame)
    except Exception as exc:
        if not is_read_error(exc):
            raise
        raise DatasetError(f"cannot read shards of {dataset.name}: {short_error(exc)}") from exc
    entries.extend(extra)
    success = bool(result.success) and all(e["success"] for e in extra)
    report = ValidationReport(
        success=success, dataset=dataset.name, rows=len(frame), results=entries
    )
    sampled = int(frame["decode_ok"].notna().sum())
    _write_json(
        dataset,
        REPORT_NAME,
        {
            "success": success,
            "dataset": dataset.name,
            "rows": len(frame),
            "sampled_rows": sampled,
            "config": config.to_dict(),
            "results": entries,
            "gx_result": result.to_json_dict(),
        },
    )
    return report
