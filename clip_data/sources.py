"""Read any image-text source as a deterministic stream of :class:`RawRecord`.

File sources go through fsspec (local paths and ``s3://`` alike; ``storage_options=`` is passed
through). Nothing is decoded or validated: captions and images are the bytes the source holds,
``None`` where missing; a record known to be unusable carries a ``problem``. Records stream one
at a time in a stable (sorted) order; only file names are held in memory.

Kinds (``open_source(uri, kind=...)``; ``kind=None`` detects it, see :func:`detect_kind`):

* ``folder``: images with a ``.txt`` caption of the same stem beside each.
* ``csv`` / ``jsonl``: ``filepath`` + ``caption`` fields (open_clip's convention), the path
  relative to the caption file's folder; ``.tsv`` files are tab-separated.
* ``webdataset``: img2dataset tar shards (``key.jpg|png|webp`` + ``key.txt`` [+ ``key.json``]),
  read front to back with ``tarfile`` (a forward-only stream) and never extracted.
* ``parquet``: image bytes (or image paths) and captions in configurable columns.
* ``synthetic``, ``fashion-mnist``, ``tuxpaint``, ``demo-mix``: built-in demo corpora.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import itertools
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from clip_data.corpora import (
    read_demo_mix,
    read_fashion_mnist,
    read_synthetic,
    read_tuxpaint,
)
from clip_data.errors import MissingDatasetError, SourceError
from clip_data.files import FileBytes, list_names, open_tar, storage_options_for
from clip_data.files import file_or_loader as _file
from clip_data.files import find_files as _find
from clip_data.files import is_read_error as _is_read_error
from clip_data.files import open_fs as _fs
from clip_data.files import read_optional as _read_optional
from clip_data.files import short_error as _short
from clip_data.records import RawRecord

__all__ = [
    "SOURCE_KINDS",
    "FileBytes",
    "MissingDatasetError",
    "SourceError",
    "WdsKeys",
    "detect_kind",
    "list_tar_shards",
    "open_source",
    "read_tar_shard",
    "read_tar_stream",
    "storage_options_for",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
WDS_IMAGE_FIELDS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: Bytes a WebDataset tar stream reads at a time (tarfile's default 10 KiB costs more calls;
#: much larger buffers cost more, as tarfile slices its buffer on every read).
_TAR_BUFSIZE = 1 << 16


# --------------------------------------------------------------------------- helpers


def _join(base: str, relative: str) -> str:
    if relative.startswith("/"):
        return relative
    if not base or base.endswith("/"):
        return base + relative
    return f"{base}/{relative}"  # = posixpath.join(base, relative), without its checks


def _stem_key(relative: str) -> str:
    """The key of a file: its relative path, normalised, without the extension."""
    path = relative.replace("\\", "/")
    if not path or "//" in path or "/." in path or path[0] == "." or path[-1] == "/":
        path = posixpath.normpath(path)  # otherwise normpath would return it unchanged
    return posixpath.splitext(path)[0]


def _text_bytes(value: str) -> bytes:
    """Back to the original bytes of text read with ``errors="surrogateescape"``."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \\ud800-style escape
        return value.encode("utf-8", "surrogatepass")


class _UniqueKeys:
    """Makes keys unique within one source: a repeated key gets a ``#n`` suffix."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def __call__(self, key: str) -> str:
        count = self._seen.get(key, 0)
        self._seen[key] = count + 1
        return key if count == 0 else f"{key}#{count}"


def _list_files(fs: Any, root: str, suffixes: tuple[str, ...]) -> list[str]:
    """Sorted files under ``root`` (a file, a folder searched recursively, or a glob)."""
    if any(ch in root for ch in "*?["):
        found = [str(p) for p in fs.glob(root)]
    elif fs.isdir(root):
        found = [str(p) for p in fs.find(root)]
    elif fs.exists(root):
        return [root]
    else:
        raise SourceError(f"no such file or folder: {root!r}")
    return sorted(p for p in found if p.lower().endswith(suffixes))


# --------------------------------------------------------------------------- folder


def read_folder(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    split: str = "train",
    lazy_images: bool = False,
) -> Iterator[RawRecord]:
    """Images with a ``.txt`` caption of the same stem beside each, searched recursively.

    The key is the path relative to ``uri`` without extension. A caption without an image
    yields ``image=None``, an image without a caption ``caption=None``. When several images
    share a stem, each keeps its extension in the key. ``lazy_images``: records carry
    :class:`FileBytes` loaders for the image and caption instead of the bytes.
    """
    fs, root = _fs(uri, storage_options)
    if not fs.isdir(root):
        raise SourceError(f"not a folder: {uri!r}")
    groups: dict[str, list[str]] = {}
    for path in _find(fs, root):
        relative = path[len(root) :].lstrip("/")
        if relative.lower().endswith((*IMAGE_EXTENSIONS, ".txt")):
            groups.setdefault(_stem_key(relative), []).append(relative)
    for stem in sorted(groups):
        files = groups[stem]
        texts = [f for f in files if f.lower().endswith(".txt")]
        images = [f for f in files if not f.lower().endswith(".txt")]
        if not images:
            caption = _read_optional(fs, _join(root, texts[0]))
            yield RawRecord(stem, None, caption, uri, split, {"caption_file": texts[0]})
            continue
        caption, text_loader = None, None
        if texts:
            caption, text_loader = _file(fs, _join(root, texts[0]), uri, lazy_images)
        for image in images:
            key = stem if len(images) == 1 else posixpath.normpath(image)
            data, loader = _file(fs, _join(root, image), uri, lazy_images)
            yield RawRecord(
                key,
                data,
                caption,
                uri,
                split,
                {"image_file": image},
                image_loader=loader,
                caption_loader=text_loader,
            )


# --------------------------------------------------------------------------- csv / jsonl


def _table_record(
    fields: dict[str, Any],
    base: str,
    fs: Any,
    uri: str,
    *,
    split: str,
    options: dict[str, str],
    lazy: bool,
) -> tuple[str, RawRecord]:
    """One CSV/JSONL row as (unique-key candidate, record); ``options`` names the columns."""
    filepath = fields.get(options["image_column"])
    caption = fields.get(options["caption_column"])
    extra = {k: v for k, v in fields.items() if k not in options.values() and k is not None}
    caption_bytes = _text_bytes(caption) if isinstance(caption, str) and caption else None
    if not isinstance(filepath, str) or not filepath:
        return "", RawRecord("", None, caption_bytes, uri, split, extra, problem="no image path")
    extra["image_file"] = filepath
    image, loader = _file(fs, _join(base, filepath), uri, lazy)
    record = RawRecord("", image, caption_bytes, uri, split, extra, image_loader=loader)
    return _stem_key(filepath), record


def read_csv(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    image_column: str = "filepath",
    caption_column: str = "caption",
    delimiter: str | None = None,
    split: str = "train",
    lazy_images: bool = False,
) -> Iterator[RawRecord]:
    """A CSV (``.tsv``: tab-separated unless ``delimiter`` says otherwise) of image paths and
    captions; paths are relative to the CSV's folder. Other columns go to ``extra``.

    Raises :class:`SourceError` naming the missing columns. A row without an image path yields
    a record with ``problem`` set; a key repeated by several rows gets a ``#n`` suffix.
    ``lazy_images``: records carry a :class:`FileBytes` loader instead of the bytes.
    """
    fs, path = _fs(uri, storage_options)
    sep = delimiter or ("\t" if path.lower().endswith(".tsv") else ",")
    columns = {"image_column": image_column, "caption_column": caption_column}
    unique, base = _UniqueKeys(), posixpath.dirname(path)
    with fs.open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.DictReader(text, delimiter=sep)
        header = [name.lstrip("\ufeff") for name in reader.fieldnames or []]  # Excel's BOM
        reader.fieldnames = header
        missing = [c for c in (image_column, caption_column) if c not in header]
        if missing:
            raise SourceError(f"{uri}: missing column(s) {missing}; found {list(header)}")
        for row_number, row in enumerate(reader, start=2):
            key, record = _table_record(
                dict(row), base, fs, uri, split=split, options=columns, lazy=lazy_images
            )
            key = unique(key or f"row-{row_number}")
            yield dataclasses.replace(record, key=key)


def read_jsonl(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    image_column: str = "filepath",
    caption_column: str = "caption",
    split: str = "train",
    lazy_images: bool = False,
) -> Iterator[RawRecord]:
    """JSON Lines with the same fields as :func:`read_csv`; other fields go to ``extra``.

    A line that is not a JSON object yields a record keyed ``line-N`` with ``problem`` set.
    """
    fs, path = _fs(uri, storage_options)
    columns = {"image_column": image_column, "caption_column": caption_column}
    unique, base = _UniqueKeys(), posixpath.dirname(path)
    with fs.open(path, "rb") as raw:
        for number, line in enumerate(raw, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as error:
                fields = error
            if not isinstance(fields, dict):
                problem = f"line {number} is not a JSON object"
                yield RawRecord(unique(f"line-{number}"), None, None, uri, split, problem=problem)
                continue
            key, record = _table_record(
                fields, base, fs, uri, split=split, options=columns, lazy=lazy_images
            )
            yield dataclasses.replace(record, key=unique(key or f"line-{number}"))


# --------------------------------------------------------------------------- webdataset


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be used, or ``None`` for a safe regular file."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.split("/"):
        return "parent-directory reference"
    if member.issym() or member.islnk():
        return "link"
    if member.isdev():
        return "device or fifo"
    if not member.isfile():
        return "not a regular file"
    return None


def _wds_record(key: str, fields: dict[str, bytes], source: str, split: str) -> RawRecord:
    image = next((fields[f] for f in WDS_IMAGE_FIELDS if f in fields), None)
    extra: dict[str, Any] = {"fields": sorted(fields)}
    if "json" in fields:
        try:
            extra["metadata"] = json.loads(fields["json"])
        except ValueError as error:
            extra["metadata_error"] = _short(error)
    return RawRecord(key, image, fields.get("txt"), source, split, extra)


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The content of a regular, non-sparse member of a stream-mode tar, read in one call.

    The stream stands at the member's data when the member is returned; tarfile skips to the
    next header itself. This avoids ``extractfile``'s per-member file wrappers.
    """
    if member.sparse is not None or tar.fileobj is None:
        handle = tar.extractfile(member)
        return handle.read() if handle is not None else b""
    data = tar.fileobj.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of data in member {member.name!r}")
    return bytes(data)


def read_tar_stream(
    fileobj: IO[bytes], source: str, *, split: str = "train", shard: str = ""
) -> Iterator[RawRecord]:
    """Samples of one WebDataset tar read front to back, never extracted
    (:func:`~clip_data.files.open_tar`: ``tarfile``'s stream mode ``"r|*"``, or a plain
    seekable tar read directly).

    Members are grouped by key (path up to the first dot of the file name); the files of a
    sample are adjacent, as img2dataset writes them. A member with an absolute path, a ``..``
    component, or that is a link or device yields a record with ``problem`` set to
    ``"unsafe tar member name: ..."``; its content is never read. Directories are skipped.
    """
    current: str | None = None
    fields: dict[str, bytes] = {}
    with open_tar(fileobj, _TAR_BUFSIZE) as tar:
        for index, member in enumerate(tar):
            if member.isdir():
                continue
            reason = _unsafe_reason(member)
            if reason is not None:
                key = f"{shard}unsafe-member-{index:06d}"
                problem = f"unsafe tar member name: {member.name!r} ({reason})"
                yield RawRecord(key, None, None, source, split, {"member": member.name}, problem)
                continue
            directory, _, filename = posixpath.normpath(member.name).rpartition("/")
            stem, _, field = filename.partition(".")
            key = f"{directory}/{stem}" if directory else stem
            if key != current:
                if current is not None:
                    yield _wds_record(current, fields, source, split)
                current, fields = key, {}
            fields[field.lower()] = _member_bytes(tar, member)
    if current is not None:
        yield _wds_record(current, fields, source, split)


class WdsKeys:
    """Makes the keys of a WebDataset source unique across its shards, in shard order.

    A key already seen in an earlier shard (or earlier in the same one) is prefixed with the
    shard's file name (``b.tar/k``), a repeat of that with ``#n``. Call it on every record's
    key, shard by shard in sorted order and members in stream order.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._unique = _UniqueKeys()

    def __call__(self, key: str, shard_name: str) -> str:
        """The unique key for ``key`` read from the shard file named ``shard_name``."""
        if key in self._seen:
            key = self._unique(f"{shard_name}/{key}")
        self._seen.add(key)
        return key


def list_tar_shards(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, list[str]]:
    """The fsspec filesystem of ``uri`` and its ``.tar`` shards, sorted.

    Raises ``SourceError`` when there are none.
    """
    fs, root = _fs(uri, storage_options)
    shards = _list_files(fs, root, (".tar",))
    if not shards:
        raise SourceError(f"no .tar shards in {uri!r}")
    return fs, shards


def _shard_records(fs: Any, shard: str, uri: str, split: str) -> Iterator[RawRecord]:
    """The records of one tar shard with their in-shard keys (see :func:`read_tar_stream`)."""
    with fs.open(shard, "rb") as handle:
        name = posixpath.basename(shard)
        yield from read_tar_stream(handle, uri, split=split, shard=f"{name}/")


def read_tar_shard(fs: Any, shard: str, uri: str, *, split: str = "train") -> Iterator[RawRecord]:
    """One shard of a WebDataset source as :func:`read_webdataset` reads it, before the keys
    are made unique across shards (:class:`WdsKeys`); read errors raise a short
    :class:`SourceError` naming ``uri``, as :func:`open_source` does. Used by ingest workers
    that each stream whole shards.
    """
    return _guarded(_shard_records(fs, shard, uri, split), uri)


def read_webdataset(
    uri: str, *, storage_options: dict[str, Any] | None = None, split: str = "train"
) -> Iterator[RawRecord]:
    """WebDataset shards: one ``.tar``, a folder of them, or a glob, in sorted order.

    Keys are the tar keys; a key already seen in an earlier shard is prefixed with the shard's
    file name so keys stay unique within the source (:class:`WdsKeys`).
    """
    fs, shards = list_tar_shards(uri, storage_options)
    keys = WdsKeys()
    for shard in shards:
        name = posixpath.basename(shard)
        for record in _shard_records(fs, shard, uri, split):
            key = keys(record.key, name)
            yield dataclasses.replace(record, key=key) if key != record.key else record


# --------------------------------------------------------------------------- parquet


def _parquet_columns(
    names: Sequence[str], image_column: str, path_column: str, caption_column: str
) -> list[str]:
    missing = [caption_column] if caption_column not in names else []
    if image_column not in names and path_column not in names:
        missing.append(f"{image_column} or {path_column}")
    if missing:
        raise SourceError(f"missing column(s) {missing}; found {list(names)}")
    return [c for c in (image_column, path_column, caption_column) if c in names]


def read_parquet(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    image_column: str = "image",
    path_column: str = "image_path",
    caption_column: str = "caption",
    key_column: str = "key",
    split: str = "train",
    batch_size: int = 256,
) -> Iterator[RawRecord]:
    """Parquet file(s) holding image bytes (``image_column``; a ``{bytes, path}`` struct is
    accepted) or image paths relative to the file's folder (``path_column``), and captions.

    Keys come from ``key_column`` when present, else ``<file stem>/<row>``. Files are read in
    batches of ``batch_size`` rows.
    """
    import pyarrow.parquet as pq

    fs, root = _fs(uri, storage_options)
    files = _list_files(fs, root, (".parquet",))
    if not files:
        raise SourceError(f"no .parquet files in {uri!r}")
    unique = _UniqueKeys()
    for file in files:
        stem = posixpath.splitext(posixpath.basename(file))[0]
        with fs.open(file, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            try:
                columns = _parquet_columns(names, image_column, path_column, caption_column)
            except SourceError as error:
                raise SourceError(f"{file}: {error}") from None
            columns += [key_column] if key_column in names else []
            row = 0
            for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
                for fields in batch.to_pylist():
                    key = str(fields.get(key_column) or f"{stem}/{row:08d}")
                    image, path = _parquet_image(fields, fs, file, image_column, path_column)
                    caption = fields.get(caption_column)
                    if isinstance(caption, str):
                        caption = _text_bytes(caption)
                    extra = {"image_file": path} if path else {}
                    yield RawRecord(unique(key), image, caption, uri, split, extra)
                    row += 1


def _parquet_image(
    fields: dict[str, Any], fs: Any, file: str, image_column: str, path_column: str
) -> tuple[bytes | None, str | None]:
    value: Any = fields.get(image_column)
    path: Any = fields.get(path_column)
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
        path = path or value.get("path")
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray):
        return bytes(value), path
    if isinstance(path, str) and path:
        return _read_optional(fs, _join(posixpath.dirname(file), path)), path
    return None, None


# --------------------------------------------------------------------------- dispatch

SOURCE_KINDS: dict[str, Callable[..., Iterator[RawRecord]]] = {
    "folder": read_folder,
    "csv": read_csv,
    "jsonl": read_jsonl,
    "webdataset": read_webdataset,
    "parquet": read_parquet,
    "synthetic": read_synthetic,
    "fashion-mnist": read_fashion_mnist,
    "tuxpaint": read_tuxpaint,
    "demo-mix": read_demo_mix,
}
_BUILTIN_NAMES = ("synthetic", "fashion-mnist", "tuxpaint", "demo-mix")
_SUFFIX_KINDS = {".tar": "webdataset", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
_SUFFIX_KINDS[".jsonl"] = "jsonl"


def detect_kind(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The kind of ``uri`` by these rules, in order:

    1. ``synthetic`` / ``synthetic:...``, ``fashion-mnist``, ``tuxpaint``, ``demo-mix`` /
       ``demo-mix:...``: the built-in corpora.
    2. A path (or glob) ending in ``.tar``, ``.parquet``, ``.csv``/``.tsv`` or ``.jsonl``.
    3. A folder holding ``.tar`` files (top level): ``webdataset``; ``.parquet`` files:
       ``parquet``; otherwise ``folder`` (images with ``.txt`` captions).
    """
    name = uri.split(":", 1)[0]
    if name in _BUILTIN_NAMES:
        return name
    lowered = uri.lower().rstrip("/")
    for suffix, kind in _SUFFIX_KINDS.items():
        if lowered.endswith(suffix):
            return kind
    if any(ch in uri for ch in "*?["):
        raise SourceError(f"cannot tell the kind of glob {uri!r}; pass kind=")
    fs, root = _fs(uri, storage_options)
    if not fs.isdir(root):
        raise SourceError(f"no such source, or unknown file type: {uri!r}")
    entries = [p.lower() for p in list_names(fs, root)]
    for suffix in (".tar", ".parquet"):
        if any(e.endswith(suffix) for e in entries):
            return _SUFFIX_KINDS[suffix]
    return "folder"


def _guarded(records: Iterator[RawRecord], uri: str) -> Iterator[RawRecord]:
    """Re-raise I/O and format errors of a source as one short :class:`SourceError`."""
    try:
        yield from records
    except Exception as error:
        if not _is_read_error(error):
            raise
        raise SourceError(f"cannot read source {uri!r}: {_short(error)}") from None


def open_source(
    uri: str, kind: str | None = None, *, lazy_images: bool = False, **options: Any
) -> Iterator[RawRecord]:
    """Stream the records of ``uri`` (a path, ``s3://`` URI or built-in corpus name).

    ``kind`` is one of :data:`SOURCE_KINDS`, or ``None`` to detect it (:func:`detect_kind`).
    ``lazy_images``: readers of image files (folder, csv, jsonl) yield records with an
    ``image_loader`` instead of the bytes (:meth:`RawRecord.loaded` reads them), so an ingest
    reads images in its worker processes; other kinds ignore it.
    ``options`` go to the reader (e.g. ``storage_options``, ``image_column``, ``limit``);
    the source is opened (its first record read) before this returns, so unknown kinds or
    options, a missing file, bucket or package raise :class:`SourceError` here; later read
    errors (a corrupt file further on) raise a short :class:`SourceError` while iterating.
    """
    if kind is None:
        storage = options.get("storage_options")
        try:
            kind = detect_kind(uri, storage)
        except Exception as error:
            if not _is_read_error(error):
                raise
            raise SourceError(f"cannot open source {uri!r}: {_short(error)}") from None
    reader = SOURCE_KINDS.get(kind)
    if reader is None:
        raise SourceError(f"unknown source kind {kind!r}; expected one of {sorted(SOURCE_KINDS)}")
    try:
        inspect.signature(reader).bind(uri, **options)
    except TypeError as error:
        raise SourceError(f"bad options for a {kind} source: {error}") from None
    if lazy_images and "lazy_images" in inspect.signature(reader).parameters:
        options = {**options, "lazy_images": True}
    stream = _guarded(reader(uri, **options), uri)
    first = next(stream, None)  # open now: a missing file, bucket or package fails here
    return stream if first is None else itertools.chain([first], stream)
