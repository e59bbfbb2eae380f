"""Dataset-level validation of an ingest output with Great Expectations.

:func:`clip_data.checks.check_record` validates records one at a time *during* ingest; this
module re-validates a finished ingest output directory as a whole, after the fact (a shard may
have been rewritten, copied badly or produced by an older/buggy writer)::

    report = validate_dataset("data/train", ValidationConfig(max_caption_chars=1024))
    print(report.summary())          # lists failing expectations only
    # <dest>/validation.json holds the full result (GX result included)

What is checked (thresholds come from :class:`ValidationConfig`, loadable from YAML/JSON):

* the metadata frame has exactly the expected columns, and every shard file has exactly the
  :data:`~clip_data.shards.ROW_SCHEMA` column names and types;
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

import hashlib
import importlib
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.parquet as pq

from clip_data.shards import MANIFEST_NAME, ROW_SCHEMA, read_manifest

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

#: Columns of :func:`metadata_frame`, in order.
FRAME_COLUMNS: tuple[str, ...] = (
    "key",
    "caption",
    "caption_chars",
    "caption_utf8_ok",
    "width",
    "height",
    "aspect",
    "sha256",
    "split",
    "source",
    "decode_ok",
)

# Shard columns read for the metadata frame (never "image" or "extra").
_META_COLUMNS = ("key", "caption", "width", "height", "sha256", "split", "source")
_EXAMPLES = 5
_HASH_CHUNK = 1 << 20


class DatasetError(ValueError):
    """The directory is not a readable ingest output (missing, no/invalid manifest, bad file)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of :func:`validate_dataset`.

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

    min_caption_chars: int = 1
    max_caption_chars: int = 4096
    min_side: int = 8
    max_side: int = 16384
    max_aspect: float = 20.0
    allowed_splits: tuple[str, ...] = ("train", "val", "test")
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
        if not _is_number(aspect) or not math.isfinite(aspect) or aspect < 1.0:
            raise ValueError(f"max_aspect must be a finite number >= 1, got {aspect!r}")
        frac = self.min_success_fraction
        if not _is_number(frac) or not 0.0 < frac <= 1.0:
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

            try:
                data = yaml.safe_load(text)
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


def _open_dataset(dest: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Check ``dest`` is an ingest output and return it with its manifest."""
    path = Path(dest)
    if not path.is_dir():
        raise DatasetError(f"{path} is not a directory")
    if not (path / MANIFEST_NAME).is_file():
        raise DatasetError(f"{path} has no {MANIFEST_NAME} (not an ingest output)")
    try:
        manifest = read_manifest(path)
        shards = manifest["shards"]
        for shard in shards:
            if not isinstance(shard["file"], str) or "/" in shard["file"]:
                raise ValueError(f"bad shard file name {shard['file']!r}")
        if "accepted" not in manifest["counts"]:
            raise KeyError("counts.accepted")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path / MANIFEST_NAME}: invalid manifest: {exc}") from exc
    return path, manifest


def _sample_indices(total: int, size: int) -> set[int]:
    """``size`` evenly spaced row indices out of ``total`` (all of them when size >= total)."""
    if size >= total:
        return set(range(total))
    return {i * total // size for i in range(size)}


def _check_image(data: object, width: object, height: object, sha256: object) -> bool:
    """Whether image bytes decode to the stored size and hash to the stored digest."""
    from clip_core.transforms import decode_image

    if not isinstance(data, bytes) or not data:
        return False
    if hashlib.sha256(data).hexdigest() != sha256:
        return False
    try:
        image = decode_image(data)
    except Exception:  # any failure to decode is a finding, not an error
        return False
    size = image.size
    image.close()
    return size == (width, height)


def _column(table: pa.Table, name: str) -> list[Any]:
    """Column values as Python objects, ``None``-filled when the shard lacks the column."""
    if name not in table.column_names:
        return [None] * table.num_rows
    col = table.column(name)
    if name == "caption" and pa.types.is_string(col.type):
        col = col.cast(pa.binary())  # decode ourselves: invalid UTF-8 must not raise
    return col.to_pylist()


def _decode_caption(raw: object) -> tuple[str | None, int | None, bool | None]:
    """``(text, chars, utf8_ok)`` of a caption read as bytes (or str)."""
    if raw is None:
        return None, None, None
    if isinstance(raw, str):
        return raw, len(raw), True
    if not isinstance(raw, bytes):
        return str(raw), len(str(raw)), False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, len(text), False
    return text, len(text), True


def _aspect(width: Any, height: Any) -> float | None:
    if not _is_number(width) or not _is_number(height):
        return None
    lo, hi = min(width, height), max(width, height)
    if lo <= 0:
        return None
    return float(hi) / float(lo)


def _read_frame(path: Path, manifest: dict[str, Any], sample_size: int) -> _DataFrame:
    pd: Any = importlib.import_module("pandas")
    files: list[pq.ParquetFile] = []
    try:
        for shard in manifest["shards"]:
            try:
                files.append(pq.ParquetFile(path / shard["file"]))
            except (OSError, pa.ArrowException) as exc:
                raise DatasetError(f"cannot read shard {shard['file']}: {exc}") from exc
        total = sum(f.metadata.num_rows for f in files)
        sample = _sample_indices(total, sample_size)
        data: dict[str, list[Any]] = {name: [] for name in FRAME_COLUMNS}
        offset = 0
        for pf, shard in zip(files, manifest["shards"], strict=True):
            present = [c for c in _META_COLUMNS if c in pf.schema_arrow.names]
            for rg in range(pf.metadata.num_row_groups):
                try:
                    table = pf.read_row_group(rg, columns=present)
                except (OSError, pa.ArrowException) as exc:
                    raise DatasetError(f"cannot read shard {shard['file']}: {exc}") from exc
                n = table.num_rows
                cols = {name: _column(table, name) for name in _META_COLUMNS}
                del table
                picked = [i for i in range(n) if offset + i in sample]
                images: dict[int, object] = {}
                if picked and "image" in pf.schema_arrow.names:
                    try:
                        image_col = pf.read_row_group(rg, columns=["image"]).column("image")
                    except (OSError, pa.ArrowException):
                        image_col = None  # unreadable image data: every pick fails
                    for i in picked:
                        images[i] = None if image_col is None else image_col[i].as_py()
                    del image_col
                for i in range(n):
                    text, chars, ok = _decode_caption(cols["caption"][i])
                    w, h = cols["width"][i], cols["height"][i]
                    data["key"].append(cols["key"][i])
                    data["caption"].append(text)
                    data["caption_chars"].append(chars)
                    data["caption_utf8_ok"].append(ok)
                    data["width"].append(w)
                    data["height"].append(h)
                    data["aspect"].append(_aspect(w, h))
                    data["sha256"].append(cols["sha256"][i])
                    data["split"].append(cols["split"][i])
                    data["source"].append(cols["source"][i])
                    decoded: bool | None = None
                    if offset + i in sample:
                        decoded = _check_image(images.get(i), w, h, cols["sha256"][i])
                    data["decode_ok"].append(decoded)
                offset += n
    finally:
        for pf in files:
            pf.close()
    frame = pd.DataFrame(data, columns=list(FRAME_COLUMNS))
    for name, dtype in (
        ("caption_chars", "Int64"),
        ("width", "Int64"),
        ("height", "Int64"),
        ("aspect", "float64"),
    ):
        try:
            frame[name] = frame[name].astype(dtype)
        except (TypeError, ValueError):  # a tampered shard with a mistyped column
            frame[name] = frame[name].astype(object)
    for name in ("caption_utf8_ok", "decode_ok"):
        frame[name] = frame[name].astype(object)
    return frame


def metadata_frame(dest: str | os.PathLike[str], sample_size: int = 256) -> _DataFrame:
    """One row per accepted row of the ingest output at ``dest``, with derived columns.

    Columns are :data:`FRAME_COLUMNS`: key, caption, caption_chars, caption_utf8_ok, width,
    height, aspect (``max/min`` side, NaN when a side is missing or <= 0), sha256, split,
    source, and decode_ok (``True``/``False`` for the ``sample_size`` evenly spaced sampled
    rows, ``None`` for the others). A column a shard lacks is ``None`` for its rows.

    Raises:
        DatasetError: ``dest`` is not an ingest output, or a listed shard cannot be read.
    """
    path, manifest = _open_dataset(dest)
    return _read_frame(path, manifest, sample_size)


# -------------------------------------------------------------------------- extra checks


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


def _file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _extra_checks(path: Path, manifest: dict[str, Any], frame: _DataFrame) -> list[dict[str, Any]]:
    """Checks GX cannot express on the frame: the manifest and the shard files themselves."""
    rows = len(frame)
    shards = manifest["shards"]
    problems: list[str] = []
    accepted = manifest["counts"].get("accepted")
    if accepted != rows:
        problems.append(f"manifest accepted={accepted!r} but {rows} rows found")
    bad_schema: list[str] = []
    bad_sha: list[str] = []
    expected_names = ROW_SCHEMA.names
    expected_types = [f.type for f in ROW_SCHEMA]
    for shard in shards:
        file = path / shard["file"]
        schema = pq.read_schema(file)
        if schema.names != expected_names or [f.type for f in schema] != expected_types:
            bad_schema.append(f"{shard['file']}: {schema.names}")
        found = pq.read_metadata(file).num_rows
        if shard.get("rows") != found:
            problems.append(f"{shard['file']}: manifest rows={shard.get('rows')!r}, found {found}")
        if _file_sha256(file) != shard.get("sha256"):
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


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file + rename)."""
    text = json.dumps(_json_safe(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
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
) -> ValidationReport:
    """Validate the ingest output at ``dest``; write ``<dest>/validation.json``.

    Returns a :class:`ValidationReport` whose ``success`` is ``True`` only when every GX
    expectation and every extra check (manifest counts, shard schema, shard SHA-256) holds.

    Raises:
        DatasetError: ``dest`` is not an ingest output, or a listed shard cannot be read.
        TypeError: ``config`` is not a :class:`ValidationConfig`.
    """
    if not isinstance(config, ValidationConfig):
        raise TypeError(f"config must be a ValidationConfig, got {type(config).__name__}")
    path, manifest = _open_dataset(dest)
    frame = _read_frame(path, manifest, config.sample_size)
    entries, result = _run_gx(frame, config)
    try:
        extra = _extra_checks(path, manifest, frame)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read shards of {path}: {exc}") from exc
    entries.extend(extra)
    success = bool(result.success) and all(e["success"] for e in extra)
    report = ValidationReport(success=success, dataset=str(path), rows=len(frame), results=entries)
    sampled = int(frame["decode_ok"].notna().sum())
    _write_json(
        path / REPORT_NAME,
        {
            "success": success,
            "dataset": str(path),
            "rows": len(frame),
            "sampled_rows": sampled,
            "config": config.to_dict(),
            "results": entries,
            "gx_result": result.to_json_dict(),
        },
    )
    return report
