"""The metadata frame of an ingest output: one row per accepted row, for dataset validation.

Shards are read row group by row group, only the small metadata columns; the image column is
read only for row groups that hold a sampled row (Parquet cannot read part of a row group's
column), where ``decode_ok`` records whether the bytes decode to the stored size and hash to
the stored ``sha256``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.parquet as pq

from clip_data.shards import MANIFEST_NAME, read_manifest

# pandas ships no type stubs in this environment: frames are typed as Any (pandas.DataFrame at
# runtime) and pandas is imported via importlib so mypy does not look for its stubs.
_DataFrame: TypeAlias = Any

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


class DatasetError(ValueError):
    """The directory is not a readable ingest output (missing, no/invalid manifest, bad file)."""


def is_number(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def open_dataset(dest: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
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
    if not is_number(width) or not is_number(height):
        return None
    lo, hi = min(width, height), max(width, height)
    if lo <= 0:
        return None
    return float(hi) / float(lo)


def read_frame(path: Path, manifest: dict[str, Any], sample_size: int) -> _DataFrame:
    """The metadata frame of an already opened ingest output (see :func:`metadata_frame`)."""
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
    path, manifest = open_dataset(dest)
    return read_frame(path, manifest, sample_size)


# -------------------------------------------------------------------------- extra checks
