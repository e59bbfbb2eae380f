"""Ingest of a multi-shard WebDataset source with one tar shard per worker task.

For a WebDataset source of several ``.tar`` shards (img2dataset writes many), each worker
process streams whole shards itself (:func:`~clip_data.sources.read_tar_shard`: forward-only,
never extracted, the same unsafe-member, missing-pair and orphan handling as
:func:`~clip_data.sources.read_webdataset`) and checks every record, so the process that
writes the output never parses a tar. The parent takes the results shard by shard in sorted
order, members in stream order, and makes the keys unique across shards with the same
:class:`~clip_data.sources.WdsKeys` as the sequential reader: the output is byte-identical to
reading the source with :func:`~clip_data.sources.open_source` and checking record by record.

Bounded memory: at most ``max_in_flight`` shards are being read or waiting to be written; the
results of one shard (its accepted images included) are held at a time per shard in flight.
"""

from __future__ import annotations

import dataclasses
import inspect
import posixpath
from collections import deque
from collections.abc import Generator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

from clip_data.checks import CheckConfig, CheckedRecord, Rejection, check_record
from clip_data.errors import SourceError
from clip_data.files import is_read_error

__all__ = ["TarPlan", "check_tars", "plan_tars"]

Result = CheckedRecord | Rejection


@dataclass(frozen=True)
class TarPlan:
    """The shards of a WebDataset source, to be read one per worker task.

    Attributes:
        uri: The source URI as given (the ``source`` of every record).
        fs: Its fsspec filesystem (pickles with its storage options, for the workers).
        shards: The ``.tar`` paths on ``fs``, sorted.
        split: The split of every record.
    """

    uri: str
    fs: Any
    shards: tuple[str, ...]
    split: str = "train"


def plan_tars(uri: str, kind: str | None, workers: int, options: dict[str, Any]) -> TarPlan | None:
    """A :class:`TarPlan` when ``uri`` is a WebDataset source of two or more shards and
    ``workers > 1``; ``None`` otherwise (one shard, one worker, another kind, or options or a
    source that :func:`~clip_data.sources.open_source` should report on: the caller then takes
    the record-by-record path, which raises the usual ``SourceError``).
    """
    from clip_data.sources import detect_kind, list_tar_shards, read_webdataset

    if workers < 2 or kind not in (None, "webdataset"):
        return None
    try:
        inspect.signature(read_webdataset).bind(uri, **options)
    except TypeError:
        return None
    storage = options.get("storage_options")
    try:
        if kind is None and detect_kind(uri, storage) != "webdataset":
            return None
        fs, shards = list_tar_shards(uri, storage)
    except Exception as error:  # open_source reports it properly on the fallback path
        if isinstance(error, SourceError) or is_read_error(error):
            return None
        raise
    if len(shards) < 2:
        return None
    return TarPlan(uri, fs, tuple(shards), str(options.get("split", "train")))


def _check_shard(plan: TarPlan, shard: str, checks: CheckConfig) -> tuple[int, list[Result]]:
    """Worker side: read one shard and check each record; ``(records read, results)``."""
    from clip_data.sources import read_tar_shard

    results = [
        check_record(record, checks)
        for record in read_tar_shard(plan.fs, shard, plan.uri, split=plan.split)
    ]
    return len(results), results


class TarResults:
    """The check results of every record of a :class:`TarPlan`, in source order.

    Iterate once; :attr:`read` counts the records the workers read from the shards.
    """

    def __init__(
        self, plan: TarPlan, checks: CheckConfig, executor: Executor, max_in_flight: int
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.plan = plan
        self.checks = checks
        self.executor = executor
        self.max_in_flight = max_in_flight
        self.read = 0

    def __iter__(self) -> Generator[Result, None, None]:
        """Submit shards (at most ``max_in_flight`` at a time) and yield their results."""
        from clip_data.sources import WdsKeys

        keys = WdsKeys()
        shards = iter(self.plan.shards)
        pending: deque[tuple[str, Future[tuple[int, list[Result]]]]] = deque()
        try:
            while True:
                while len(pending) < self.max_in_flight:
                    shard = next(shards, None)
                    if shard is None:
                        break
                    future = self.executor.submit(_check_shard, self.plan, shard, self.checks)
                    pending.append((shard, future))
                if not pending:
                    return
                shard, future = pending.popleft()
                count, results = future.result()
                self.read += count
                name = posixpath.basename(shard)
                for result in results:
                    key = keys(result.key, name)
                    yield dataclasses.replace(result, key=key) if key != result.key else result
                del results
        finally:
            for _, future in pending:
                future.cancel()


def check_tars(
    plan: TarPlan, checks: CheckConfig, executor: Executor, max_in_flight: int
) -> TarResults:
    """The results of every record of ``plan``, shards checked in ``executor``'s workers."""
    return TarResults(plan, checks, executor, max_in_flight)
