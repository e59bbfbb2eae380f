"""Multi-shard WebDataset ingest with one tar per worker task: same bytes as record by record."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from clip_data.checks import CheckConfig
from clip_data.errors import SourceError
from clip_data.ingest import IngestConfig, ingest
from clip_data.shards import ShardConfig
from clip_data.sources import open_source
from clip_data.wds_ingest import TarPlan, check_tars, plan_tars

SHARDS = ShardConfig(target_shard_bytes=4_000, row_group_rows=4)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16 + i % 20, 16 + i % 7), (i * 37 % 256, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard(path: Path, t: int) -> None:
    """Good pairs, keys repeated across shards and within one, duplicates and every bad case."""
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i in range(12):
            key = f"{i:04d}" if i < 3 else f"{t}_{i:04d}"  # 0000-0002 in every shard
            _add(tar, f"{key}.png", _png(t * 12 + i if i % 5 else 3))  # some duplicates
            if i % 7:
                _add(tar, f"{key}.txt", f"caption {t} {i}".encode())  # else: no caption
            if i % 4 == 0:
                _add(tar, f"{key}.json", b'{"a": 1}' if i % 8 else b"{bad json")
        _add(tar, "orphan.txt", b"a caption without an image")
        _add(tar, "../evil.txt", b"x")
        _add(tar, "/abs.png", b"x")
        _add(tar, "sub/nested.png", _png(77))
        _add(tar, "sub/nested.txt", b"nested caption")
        _add(tar, "corrupt.png", b"\x89PNG nope")
        _add(tar, "corrupt.txt", b"corrupt")
        _add(tar, "0001.png", _png(5))  # the same key again later in the shard
        _add(tar, "0001.txt", b"again")


def _source(root: Path, shards: int = 5) -> Path:
    root.mkdir()
    for t in reversed(range(shards)):  # written out of order: read in sorted order
        _shard(root / f"{t:05d}.tar", t)
    return root


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _config(workers: int) -> IngestConfig:
    return IngestConfig(workers=workers, chunk_size=4, max_bad_fraction=1.0, shards=SHARDS)


def test_parallel_shards_give_the_same_bytes(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    assert plan_tars(str(src), None, 2, {}) is not None  # the shard-per-worker path runs
    one = ingest(str(src), tmp_path / "one", _config(1), progress=False)
    two = ingest(str(src), tmp_path / "two", _config(2), progress=False)
    three = ingest(str(src), tmp_path / "three", _config(3), progress=False)
    assert one == two == three
    digests = _digests(tmp_path / "one")
    assert digests == _digests(tmp_path / "two") == _digests(tmp_path / "three")
    assert len([name for name in digests if name.startswith("part-")]) >= 2
    counts = two["counts"]
    assert counts["read"] == sum(1 for _ in open_source(str(src)))
    assert counts["accepted"] + counts["quarantined"] + counts["duplicates"] == counts["read"]
    per_reason = counts["per_reason"]
    assert per_reason["unsafe_member"] == 10  # '../' and absolute names, two per shard
    assert per_reason["missing_image"] == 5 and per_reason["missing_caption"] > 0
    assert per_reason["decode_error"] == 5 and counts["duplicates"] > 0


def test_plan_only_for_several_shards_and_workers(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", shards=2)
    assert plan_tars(str(src), None, 1, {}) is None
    assert plan_tars(str(src / "00000.tar"), None, 2, {}) is None  # one shard: parent reads
    assert plan_tars(str(src), "folder", 2, {}) is None
    assert plan_tars(str(src), None, 2, {"image_column": "x"}) is None  # open_source reports
    assert plan_tars(str(tmp_path / "missing"), None, 2, {}) is None
    plan = plan_tars(str(src / "*.tar"), "webdataset", 2, {"split": "test"})
    assert plan is not None and plan.split == "test"
    assert [Path(s).name for s in plan.shards] == ["00000.tar", "00001.tar"]
    one = ingest(str(src / "00000.tar"), tmp_path / "single", _config(2), progress=False)
    assert one["counts"]["read"] > 0
    with pytest.raises(SourceError, match="bad options for a webdataset source"):
        ingest(str(src), tmp_path / "bad", _config(2), image_column="x")


def test_a_corrupt_shard_is_a_short_source_error(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", shards=3)
    (src / "00001.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(SourceError, match=r"cannot read source .*src") as caught:
        ingest(str(src), tmp_path / "out", _config(2), progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


class _Collected(Future[Any]):
    """A finished future that tells its executor when its result is collected."""

    def __init__(self, executor: _CountingExecutor) -> None:
        super().__init__()
        self.executor = executor

    def result(self, timeout: float | None = None) -> Any:
        self.executor.outstanding -= 1
        return super().result(timeout)


class _CountingExecutor(Executor):
    """Runs each task at once; records the most tasks submitted and not yet collected."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.most = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)
        future = _Collected(self)
        future.set_result(fn(*args, **kwargs))
        return future


def test_shards_in_flight_are_bounded(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", shards=6)
    plan = plan_tars(str(src), None, 2, {})
    assert isinstance(plan, TarPlan)
    executor = _CountingExecutor()
    stream = check_tars(plan, CheckConfig(), executor, max_in_flight=2)
    seen = sum(1 for _ in stream)
    assert stream.read == seen == sum(1 for _ in open_source(str(src)))
    assert executor.most == 2 and executor.outstanding == 0
    with pytest.raises(ValueError, match="max_in_flight"):
        check_tars(plan, CheckConfig(), executor, max_in_flight=0)


@pytest.mark.usefixtures("moto_s3")
def test_s3_shards_are_read_by_the_workers(moto_s3: tuple[str, Any], tmp_path: Path) -> None:
    endpoint, client = moto_s3
    client.create_bucket(Bucket="clipops-wds")
    src = _source(tmp_path / "src", shards=3)
    for shard in sorted(src.glob("*.tar")):
        client.put_object(Bucket="clipops-wds", Key=f"wds/{shard.name}", Body=shard.read_bytes())
    options = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    uri = "s3://clipops-wds/wds/"
    assert plan_tars(uri, None, 2, {"storage_options": options}) is not None
    one = ingest(uri, tmp_path / "one", _config(1), progress=False, storage_options=options)
    two = ingest(uri, tmp_path / "two", _config(2), progress=False, storage_options=options)
    assert one == two and one["counts"]["read"] > 0
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")
