"""Ingest: stream a source's records through validation into shards and a quarantine.

:func:`ingest_records` pulls :class:`~clip_data.records.RawRecord` objects from any iterable,
runs :func:`~clip_data.checks.check_record` on each (in a pool of worker processes, since
decoding images is the cost) and writes accepted rows and rejections with
:class:`~clip_data.shards.ShardWriter`. :func:`ingest` does the same for a source URI opened
with :func:`~clip_data.sources.open_source`.

Determinism: results are written in source order whatever the number of workers, so the same
records and configuration give byte-identical shards and an identical manifest with
``workers=1`` (checked in-process) or any other worker count. Settings that only affect how
the work runs (``workers``, ``chunk_size``) are left out of the manifest for that reason.

Bounded memory: records are read lazily in chunks of ``chunk_size``; at most
``workers * 4`` chunks (:attr:`IngestConfig.window`) are being checked or waiting to be
written at any time, so the source is never read more than ``window`` records ahead of the
writer, however fast it is.

Accounting: every record read becomes an accepted row, a duplicate or a quarantined row
(``read == accepted + duplicates + quarantined``, verified against the number of records
actually pulled from the source). When the quarantined fraction exceeds
``max_bad_fraction``, :class:`IngestFailed` is raised *after* the output has been written, so
the quarantine can be inspected.

Workers are started with the ``forkserver`` method (``spawn`` where that is unavailable), never
by forking this process: a script that calls :func:`ingest` with ``workers > 1`` needs the
usual ``if __name__ == "__main__":`` guard, as for any non-fork multiprocessing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, TextIO, cast

try:
    import fcntl
except ImportError:  # Windows: the pipes keep their default size
    fcntl = None  # type: ignore[assignment]

from clip_data.checks import CheckConfig, CheckedRecord, Rejection, check_record
from clip_data.records import RawRecord
from clip_data.remote import is_remote, join_uri, upload_output
from clip_data.shards import (
    QUARANTINE_NAME,
    Manifest,
    ShardConfig,
    ShardWriter,
    read_manifest,
)
from clip_data.wds_ingest import TarPlan, check_tars, plan_tars

__all__ = ["IngestConfig", "IngestFailed", "bad_fraction", "ingest", "ingest_records", "summarize"]

#: Fields of :class:`IngestConfig` that change how the work runs, never what is written.
EXECUTION_FIELDS: tuple[str, ...] = ("workers", "chunk_size")
#: Chunks in flight per worker (being checked, queued, or waiting to be written).
_CHUNKS_PER_WORKER = 4
#: Modules the forkserver imports once, so a worker forked from it starts with them (the
#: checks, the chunk and tar-shard tasks and what they import: Pillow, pyarrow, fsspec).
_PRELOAD = ["clip_data.checks", "clip_data.ingest", "clip_data.sources", "clip_data.wds_ingest"]
#: Pipe buffer asked for the pool's queues: a chunk of results (images included) at once.
_PIPE_BYTES = 1 << 20
#: Shortest interval between two progress redraws, in seconds.
_PROGRESS_INTERVAL = 0.25
#: Interval between two progress lines when the stream is not a terminal, in seconds.
PROGRESS_LINE_INTERVAL = 10.0


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class IngestConfig:
    """How an ingest runs.

    Attributes:
        checks: Validation thresholds (:class:`~clip_data.checks.CheckConfig`).
        shards: Shard layout (:class:`~clip_data.shards.ShardConfig`).
        max_bad_fraction: Largest accepted ``quarantined / read``; above it the output is
            still written, then :class:`IngestFailed` is raised.
        workers: Processes that run the checks; ``1`` checks in this process.
        chunk_size: Records sent to a worker at a time.
    """

    checks: CheckConfig = field(default_factory=CheckConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    max_bad_fraction: float = 0.05
    workers: int = 2
    chunk_size: int = 64

    def __post_init__(self) -> None:
        """Validate the fields with a clear ``ValueError``/``TypeError``."""
        if not isinstance(self.checks, CheckConfig):
            raise TypeError(f"checks must be a CheckConfig, got {type(self.checks).__name__}")
        if not isinstance(self.shards, ShardConfig):
            raise TypeError(f"shards must be a ShardConfig, got {type(self.shards).__name__}")
        fraction = self.max_bad_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise ValueError(f"max_bad_fraction must be a number, got {fraction!r}")
        if not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {fraction!r}")
        _positive_int("workers", self.workers)
        _positive_int("chunk_size", self.chunk_size)

    @property
    def window(self) -> int:
        """Most records read from the source but not yet written (``1`` with one worker)."""
        if self.workers == 1:
            return 1
        return self.workers * self.chunk_size * _CHUNKS_PER_WORKER

    def to_dict(self) -> dict[str, Any]:
        """All settings as plain JSON-compatible values."""
        return {
            "checks": dataclasses.asdict(self.checks),
            "shards": dataclasses.asdict(self.shards),
            "max_bad_fraction": self.max_bad_fraction,
            "workers": self.workers,
            "chunk_size": self.chunk_size,
        }


def summarize(manifest: Manifest | dict[str, Any]) -> str:
    """One line of counts: ``read 40, accepted 30, duplicates 2, quarantined 8 (...)``."""
    counts = manifest["counts"]
    reasons = ", ".join(f"{r}={n}" for r, n in counts["per_reason"].items())
    text = (
        f"read {counts['read']}, accepted {counts['accepted']}, "
        f"duplicates {counts['duplicates']}, quarantined {counts['quarantined']}"
    )
    return f"{text} ({reasons})" if reasons else text


def bad_fraction(manifest: Manifest | dict[str, Any]) -> float:
    """``quarantined / read`` (``0.0`` for an empty source)."""
    counts = manifest["counts"]
    read = int(counts["read"])
    return int(counts["quarantined"]) / read if read else 0.0


class IngestFailed(RuntimeError):  # noqa: N818 - the name is part of the API
    """Too many records were quarantined; the output was written all the same.

    Attributes:
        manifest: The manifest of the written output.
        dest: Where the output (and its ``quarantine.parquet``) lies.
        summary: The short message (counts per reason, bad fraction against the maximum).
    """

    def __init__(self, manifest: Manifest, dest: str, max_bad_fraction: float) -> None:
        counts = manifest["counts"]
        self.manifest = manifest
        self.dest = dest
        self.summary = (
            f"{counts['quarantined']} of {counts['read']} records quarantined "
            f"({bad_fraction(manifest):.1%} > max_bad_fraction {max_bad_fraction:.1%}); "
            f"{summarize(manifest)}; see {_join(dest, QUARANTINE_NAME)}"
        )
        super().__init__(self.summary)


def _join(dest: str, name: str) -> str:
    return join_uri(dest, name) if is_remote(dest) else str(Path(dest) / name)


# ------------------------------------------------------------------------- checking


def _check_chunk(records: list[RawRecord], checks: CheckConfig) -> list[CheckedRecord | Rejection]:
    """Worker side: check a chunk; accepted rows come back without their image bytes.

    The parent still holds the original records and puts the bytes back, so images cross
    the process boundary once instead of twice. Images the worker read itself (records with
    an ``image_loader``) and re-encoded images (``checks.reencode``) travel back.
    """
    results: list[CheckedRecord | Rejection] = []
    for record in records:
        result = check_record(record, checks)
        if (
            isinstance(result, CheckedRecord)
            and checks.reencode is None
            and record.image is not None
        ):
            result = dataclasses.replace(result, image=b"")
        results.append(result)
    return results


def _restore(record: RawRecord, result: CheckedRecord | Rejection) -> CheckedRecord | Rejection:
    if isinstance(result, CheckedRecord) and not result.image:
        assert record.image is not None  # accepted, so there was an image
        return dataclasses.replace(result, image=bytes(record.image))
    return result


def _executor(workers: int) -> ProcessPoolExecutor:
    """A process pool that never forks this (possibly threaded) process directly."""
    methods = multiprocessing.get_all_start_methods()
    context: BaseContext
    if "forkserver" in methods:
        context = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported the checks (and torch) and the
        # tasks once: each worker then starts in milliseconds, not a few hundred.
        context.set_forkserver_preload(_PRELOAD)
    else:
        context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    _widen_pipes(executor)
    return executor


def _widen_pipes(executor: ProcessPoolExecutor) -> None:
    """Give the pool's result and call pipes ``_PIPE_BYTES`` of buffer where Linux allows.

    A chunk's results carry its images (~1 MB for 64 photos). Through a default 64 KiB pipe
    that is ~15 writes, and between two of them the pool's reader thread must win the GIL
    back from the writing loop (up to ``sys.getswitchinterval()``, 5 ms, each time) while the
    worker sits blocked, and every other worker's results queue up behind it on the same
    pipe. With a pipe as large as a chunk, a worker hands over its results in one write and
    goes on checking. Best effort: without ``F_SETPIPE_SZ`` (not Linux) or beyond the
    system's ``pipe-max-size``, the pipes keep their size; the output is the same either way.
    """
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if set_size is None:
        return
    for queue in (getattr(executor, "_result_queue", None), getattr(executor, "_call_queue", None)):
        reader = getattr(queue, "_reader", None)
        if reader is None:
            continue
        with contextlib.suppress(OSError, ValueError):
            fcntl.fcntl(reader.fileno(), set_size, _PIPE_BYTES)


def _check_stream(
    records: Iterable[RawRecord], config: IngestConfig
) -> Generator[CheckedRecord | Rejection, None, None]:
    """The check result of every record, in source order, read at most ``window`` ahead."""
    if config.workers == 1:
        for record in records:
            yield check_record(record, config.checks)
        return
    source = iter(records)
    max_chunks = config.workers * _CHUNKS_PER_WORKER
    pending: deque[tuple[list[RawRecord], Future[list[CheckedRecord | Rejection]]]] = deque()
    executor = _executor(config.workers)
    try:
        while True:
            while len(pending) >= max_chunks:  # make room before reading any further
                chunk, future = pending.popleft()
                for record, result in zip(chunk, future.result(), strict=True):
                    yield _restore(record, result)
            chunk = list(islice(source, config.chunk_size))
            if not chunk:
                break
            pending.append((chunk, executor.submit(_check_chunk, chunk, config.checks)))
        while pending:
            chunk, future = pending.popleft()
            for record, result in zip(chunk, future.result(), strict=True):
                yield _restore(record, result)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class _TarStream:
    """The results of a :class:`~clip_data.wds_ingest.TarPlan`, shards checked in a pool."""

    def __init__(self, plan: TarPlan, config: IngestConfig) -> None:
        self.plan = plan
        self.config = config
        self.read = 0  # records the workers read, known once the results are exhausted

    def results(self) -> Generator[CheckedRecord | Rejection, None, None]:
        """Every result in source order; at most ``workers + 1`` shards in flight."""
        executor = _executor(self.config.workers)
        try:
            stream = check_tars(self.plan, self.config.checks, executor, self.config.workers + 1)
            yield from stream
            self.read = stream.read
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------- progress


class _Progress:
    """Ingest progress on ``stream``: on a terminal a status line redrawn in place at most
    every ``_PROGRESS_INTERVAL`` s; otherwise (a log file, a pipe) one line every
    :data:`PROGRESS_LINE_INTERVAL` s. Either way a closing line with the totals."""

    def __init__(self, stream: TextIO, enabled: bool, redraw: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.redraw = redraw
        self.start = time.monotonic()
        self._last = -math.inf if redraw else self.start
        self._width = 0

    def _line(self, done: int, quarantined: int) -> str:
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        return f"ingest: {done:,} rows read, {quarantined:,} quarantined, {rate:,.0f} rows/s"

    def _draw(self, text: str, end: str = "") -> None:
        if self.redraw:
            pad = " " * max(0, self._width - len(text))
            self.stream.write(f"\r{text}{pad}{end}")
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, done: int, quarantined: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= (_PROGRESS_INTERVAL if self.redraw else PROGRESS_LINE_INTERVAL):
            self._last = now
            self._draw(self._line(done, quarantined))

    def finish(self, done: int, quarantined: int) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.start
            self._draw(f"{self._line(done, quarantined)}, {elapsed:.1f} s", end="\n")


# ------------------------------------------------------------------------- ingest


def _manifest_config(config: IngestConfig, source_desc: dict[str, Any] | None) -> dict[str, Any]:
    """What the manifest records: the output-determining settings and the source."""
    settings = {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}
    if source_desc is not None:
        settings["source"] = source_desc
    return settings


def _check_accounting(manifest: Manifest, pulled: int, written: int) -> None:
    """Raise ``AssertionError`` unless every record pulled was written and counted once."""
    counts = manifest["counts"]
    total = counts["accepted"] + counts["duplicates"] + counts["quarantined"]
    if not (counts["read"] == total == pulled == written):
        raise AssertionError(
            f"row accounting broken: pulled {pulled} records from the source, wrote {written}; "
            f"manifest read={counts['read']}, accepted={counts['accepted']}, "
            f"duplicates={counts['duplicates']}, quarantined={counts['quarantined']}"
        )


def ingest_records(
    records: Iterable[RawRecord],
    dest: str | os.PathLike[str],
    config: IngestConfig = IngestConfig(),  # frozen, so a shared default is safe
    source_desc: dict[str, Any] | None = None,
    progress: bool | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Check every record and write the accepted rows and the quarantine to ``dest``.

    Args:
        records: The raw records, consumed lazily (at most ``config.window`` ahead of what
            has been written).
        dest: Output directory (see :class:`~clip_data.shards.ShardWriter`: published
            atomically, an earlier ingest output there is replaced), or a URL such as
            ``s3://bucket/prefix``: the output is then written to a local staging directory
            and uploaded, ``manifest.json`` last (see :mod:`clip_data.remote`).
        config: Thresholds, layout, failure limit and parallelism.
        source_desc: JSON-compatible description of the source, stored in the manifest's
            ``ingest_config["source"]``.
        progress: Progress on stderr: ``None`` or ``True``: a line redrawn in place on a
            terminal, else a line every ``PROGRESS_LINE_INTERVAL`` s; ``False``: none.
        storage_options: fsspec options for a URL ``dest`` (e.g. S3 endpoint, credentials).

    Returns:
        The manifest of the written output.

    Raises:
        IngestFailed: More than ``config.max_bad_fraction`` of the records were
            quarantined (the output is written first).
        AssertionError: The row accounting does not add up (a bug, never bad data).
        DestinationError: A URL ``dest`` cannot be reached or written.
        Any exception from the source or the writer; ``dest`` is then left untouched
        (a URL ``dest`` is only touched once the whole output is staged).
    """
    if not isinstance(config, IngestConfig):
        raise TypeError(f"config must be an IngestConfig, got {type(config).__name__}")
    counter = _Counted(records)
    return _ingest_checked(
        lambda: _check_stream(counter, config),
        lambda: counter.pulled,
        dest,
        config,
        _Output(source_desc, progress, storage_options),
    )


class _Counted:
    """An iterable that counts the records pulled through it."""

    def __init__(self, records: Iterable[RawRecord]) -> None:
        self.records = records
        self.pulled = 0

    def __iter__(self) -> Iterator[RawRecord]:
        for record in self.records:
            self.pulled += 1
            yield record


@dataclass(frozen=True)
class _Output:
    """Where and how :func:`_ingest_checked` reports: manifest source, progress, storage."""

    source_desc: dict[str, Any] | None
    progress: bool | None
    storage_options: dict[str, Any] | None


def _ingest_checked(
    check: Callable[[], Generator[CheckedRecord | Rejection, None, None]],
    pulled: Callable[[], int],
    dest: str | os.PathLike[str],
    config: IngestConfig,
    output: _Output,
) -> Manifest:
    """Write the results of ``check()`` to ``dest`` (see :func:`ingest_records`).

    ``check`` starts the checking (called once, when writing starts); ``pulled`` returns the
    number of records read from the source once the results are exhausted.
    """
    if is_remote(dest):
        return _ingest_remote(check, pulled, str(dest), config, output)
    tty = sys.stderr.isatty()
    meter = _Progress(sys.stderr, output.progress is not False, redraw=tty)
    written = quarantined = 0
    results = check()
    try:
        # check_record hashed the very bytes it returned: no need to hash them again here.
        settings = _manifest_config(config, output.source_desc)
        with ShardWriter(dest, config.shards, settings, verify_sha256=False) as writer:
            for result in results:
                if isinstance(result, Rejection):
                    writer.reject(result)
                    quarantined += 1
                else:
                    writer.add(result)
                written += 1
                meter.update(written, quarantined)
    finally:
        results.close()  # stops the worker pool, also when the source or writer failed
        meter.finish(written, quarantined)
    manifest = writer.manifest
    if manifest is None:  # ShardWriter.close sets it on a clean exit
        raise AssertionError("ShardWriter closed without a manifest")

    _check_accounting(manifest, pulled(), written)
    from clip_data.versioning import stamp_manifest

    # The dataset version (DVC md5) later stages log, from the hashes taken while writing.
    stamp_manifest(writer.dest, writer.file_md5s)
    manifest = cast(Manifest, read_manifest(writer.dest))
    if bad_fraction(manifest) > config.max_bad_fraction:
        raise IngestFailed(manifest, str(writer.dest), config.max_bad_fraction)
    return manifest


def _ingest_remote(
    check: Callable[[], Generator[CheckedRecord | Rejection, None, None]],
    pulled: Callable[[], int],
    dest: str,
    config: IngestConfig,
    output: _Output,
) -> Manifest:
    """:func:`_ingest_checked` to a URL: stage in a temporary directory, then upload."""
    storage_options = output.storage_options
    with tempfile.TemporaryDirectory(prefix="clipops-ingest-") as stage:
        local = Path(stage) / "output"
        local_output = dataclasses.replace(output, storage_options=None)
        try:
            manifest = _ingest_checked(check, pulled, local, config, local_output)
        except IngestFailed as failed:  # still published, as for a local destination
            upload_output(local, dest, storage_options)
            raise IngestFailed(failed.manifest, dest, config.max_bad_fraction) from None
        upload_output(local, dest, storage_options)
    return manifest


def _describe_options(options: dict[str, Any]) -> dict[str, Any]:
    """Source options for the manifest: credentials never recorded, the rest as JSON."""
    described: dict[str, Any] = {}
    for name in sorted(options):
        value = options[name]
        if name == "storage_options" and isinstance(value, dict):
            described[name] = sorted(str(k) for k in value)  # names only, never secrets
        else:
            described[name] = json.loads(json.dumps(value, default=repr))
    return described


def _detected_kind(source: str, options: dict[str, Any]) -> str | None:
    """The source's kind, detected once (a large folder is listed for it); ``None`` when
    detection fails: :func:`~clip_data.sources.open_source` then reports the error."""
    from clip_data.sources import detect_kind

    try:
        return detect_kind(source, options.get("storage_options"))
    except Exception:  # reported (a SourceError) by open_source, which detects it again
        return None


def ingest(
    source: str,
    dest: str | os.PathLike[str],
    config: IngestConfig = IngestConfig(),  # frozen, so a shared default is safe
    kind: str | None = None,
    *,
    progress: bool | None = None,
    dest_storage_options: dict[str, Any] | None = None,
    **source_options: Any,
) -> Manifest:
    """Open ``source`` with :func:`~clip_data.sources.open_source` and ingest it to ``dest``.

    ``kind`` and ``source_options`` go to ``open_source`` (``SourceError`` for an unknown
    kind or option, or a source that cannot be read) and are recorded in the manifest
    (``storage_options`` by key names only). ``dest_storage_options``: fsspec options of a
    URL ``dest`` (never recorded). See :func:`ingest_records` for the rest.

    A WebDataset source of two or more ``.tar`` shards with ``config.workers > 1`` is read by
    the workers, whole shards each (:mod:`clip_data.wds_ingest`; at most
    ``config.workers + 1`` shards in flight); the output is the same, byte for byte. One
    shard, or one worker, is read here and checked in chunks like any other source.
    """
    desc = {"uri": source, "kind": kind, "options": _describe_options(source_options)}
    output = _Output(desc, progress, dest_storage_options)
    if not isinstance(config, IngestConfig):
        raise TypeError(f"config must be an IngestConfig, got {type(config).__name__}")
    from clip_data.sources import open_source

    kind = kind if kind is not None else _detected_kind(source, source_options)
    # Undetectable: no plan (it would detect again); open_source reports why.
    plan = None if kind is None else plan_tars(source, kind, config.workers, source_options)
    if plan is not None:  # several tar shards: each worker streams whole shards itself
        tars = _TarStream(plan, config)
        return _ingest_checked(tars.results, lambda: tars.read, dest, config, output)

    # Image files are read where they are checked (in the workers), not in this process.
    records = open_source(source, kind, lazy_images=True, **source_options)
    return ingest_records(
        records,
        dest,
        config,
        source_desc=desc,
        progress=progress,
        storage_options=dest_storage_options,
    )
