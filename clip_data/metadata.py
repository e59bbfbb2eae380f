"""The metadata frame of an ingest output: one row per accepted row, for dataset validation.

An ingest output is a local directory or any fsspec URL (``s3://bucket/prefix``):
:func:`open_dataset` reads and checks its manifest and returns a :class:`Dataset`, through
which the shards are read (pyarrow over fsspec for a URL, so only the byte ranges needed).

Shards are read row group by row group, only the small metadata columns; the image column is
read only for row groups that hold a sampled row (Parquet cannot read part of a row group's
column), where ``decode_ok`` records whether the bytes decode to the stored size and hash to
the stored ``sha256``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from clip_data.files import is_read_error, open_fs, short_error
from clip_data.shard_format import MANIFEST_NAME, file_sha256, read_manifest

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
_HASH_CHUNK = 1 << 20


class DatasetError(ValueError):
    """The directory is not a readable ingest output (missing, no/invalid manifest, bad file)."""


def is_number(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Dataset:
    """An opened ingest output: a local directory or an fsspec URL, and its manifest.

    Attributes:
        name: The output as named in messages and reports: the local path or the URL.
        root: The local directory, or the URL's path on ``fs``.
        fs: The fsspec filesystem of a URL; ``None`` for a local directory.
        manifest: The parsed ``manifest.json`` (schema version and shard names checked).
    """

    name: str
    root: str
    fs: Any
    manifest: dict[str, Any]

    def where(self, file: str) -> str:
        """``file`` of the output, as named in messages."""
        return str(Path(self.name) / file) if self.fs is None else f"{self.name}/{file}"

    def parquet(self, file: str) -> pq.ParquetFile:
        """Open the Parquet file ``file`` of the output (close it when done)."""
        if self.fs is None:
            return pq.ParquetFile(Path(self.root) / file)
        handler = pa.fs.PyFileSystem(pa.fs.FSSpecHandler(self.fs))
        return pq.ParquetFile(f"{self.root}/{file}", filesystem=handler)

    def sha256(self, file: str) -> str:
        """Hex SHA-256 of ``file`` of the output, read in chunks."""
        if self.fs is None:
            return file_sha256(Path(self.root) / file)
        digest = hashlib.sha256()
        with self.fs.open(f"{self.root}/{file}", "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


def open_dataset(
    dest: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Dataset:
    """Check ``dest`` (a local directory or an fsspec URL) is an ingest output; open it.

    ``storage_options``: fsspec options of a URL ``dest`` (endpoint, credentials, ...).
    """
    text = os.fspath(dest)
    if "://" in text:
        return _open_url(text.rstrip("/"), storage_options)
    path = Path(dest)
    if not path.is_dir():
        raise DatasetError(f"{path} is not a directory")
    if not (path / MANIFEST_NAME).is_file():
        raise DatasetError(f"{path} has no {MANIFEST_NAME} (not an ingest output)")
    try:
        manifest = _checked_manifest(read_manifest(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path / MANIFEST_NAME}: invalid manifest: {exc}") from exc
    return Dataset(name=str(path), root=str(path), fs=None, manifest=manifest)


def _open_url(uri: str, storage_options: dict[str, Any] | None) -> Dataset:
    r""":func:`open_dataset` of a URL; storage failures are one-line ``DatasetError``\ s."""
    try:
        fs, root = open_fs(uri, storage_options)
    except (ValueError, ImportError) as exc:  # an unknown protocol, a missing fsspec backend
        raise DatasetError(f"cannot open {uri}: {short_error(exc)}") from None
    try:
        fs.invalidate_cache(root)  # another process may have rewritten the output
        manifest = _checked_manifest(read_manifest(uri, storage_options))
    except FileNotFoundError:
        raise DatasetError(f"{uri} has no {MANIFEST_NAME} (not an ingest output)") from None
    except OSError as exc:  # already one line, naming the manifest and the cause
        raise DatasetError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{uri}/{MANIFEST_NAME}: invalid manifest: {exc}") from exc
    return Dataset(name=uri, root=root, fs=fs, manifest=manifest)


def _checked_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` once its shard names and accepted count are there (else raise)."""
    for shard in manifest["shards"]:
        if not isinstance(shard["file"], str) or "/" in shard["file"]:
            raise ValueError(f"bad shard file name {shard['file']!r}")
    if "accepted" not in manifest["counts"]:
        raise KeyError("counts.accepted")
    return manifest


def read_error(dataset: Dataset, file: str, error: Exception) -> DatasetError:
    """The one-line error for a file of ``dataset`` that cannot be read; re-raise bugs.

    Raises:
        Exception: ``error`` itself when it is not an I/O, storage or Parquet error.
    """
    if not is_read_error(error):
        raise error
    return DatasetError(f"cannot read shard {dataset.where(file)}: {short_error(error)}")


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


def read_frame(dataset: Dataset, sample_size: int) -> _DataFrame:
    """The metadata frame of an already opened ingest output (see :func:`metadata_frame`)."""
    pd: Any = importlib.import_module("pandas")
    manifest = dataset.manifest
    files: list[pq.ParquetFile] = []
    try:
        for shard in manifest["shards"]:
            try:
                files.append(dataset.parquet(shard["file"]))
            except Exception as exc:
                raise read_error(dataset, shard["file"], exc) from exc
        total = sum(f.metadata.num_rows for f in files)
        sample = _sample_indices(total, sample_size)
        data: dict[str, list[Any]] = {name: [] for name in FRAME_COLUMNS}
        offset = 0
        for pf, shard in zip(files, manifest["shards"], strict=True):
            present = [c for c in _META_COLUMNS if c in pf.schema_arrow.names]
            for rg in range(pf.metadata.num_row_groups):
                try:
                    table = pf.read_row_group(rg, columns=present)
                except Exception as exc:
                    raise read_error(dataset, shard["file"], exc) from exc
                n = table.num_rows
                cols = {name: _column(table, name) for name in _META_COLUMNS}
                del table
                picked = [i for i in range(n) if offset + i in sample]
                images: dict[int, object] = {}
                if picked and "image" in pf.schema_arrow.names:
                    try:
                        image_col = pf.read_row_group(rg, columns=["image"]).column("image")
                    except Exception as exc:
                        if not is_read_error(exc):
                            raise
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


def metadata_frame(
    dest: str | os.PathLike[str],
    sample_size: int = 256,
    storage_options: dict[str, Any] | None = None,
) -> _DataFrame:
    """One row per accepted row of the ingest output at ``dest``, with derived columns.

    Columns are :data:`FRAME_COLUMNS`: key, caption, caption_chars, caption_utf8_ok, width,
    height, aspect (``max/min`` side, NaN when a side is missing or <= 0), sha256, split,
    source, and decode_ok (``True``/``False`` for the ``sample_size`` evenly spaced sampled
    rows, ``None`` for the others). A column a shard lacks is ``None`` for its rows.
    ``dest`` is a local directory or an fsspec URL (``s3://...``, with ``storage_options``).

    Raises:
        DatasetError: ``dest`` is not an ingest output, or a listed shard cannot be read.
    """
    return read_frame(open_dataset(dest, storage_options), sample_size)


# -------------------------------------------------------------------------- extra checks
