"""Tests of clip_data.ingest and ``clipops ingest``: accounting, determinism across worker
counts, bounded read-ahead, the failure threshold, progress output and the CLI."""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clip_data.ingest as ingest_module
from clip_cli.main import main
from clip_data.checks import CheckConfig
from clip_data.ingest import IngestConfig, IngestFailed, ingest, ingest_records
from clip_data.records import RawRecord
from clip_data.shards import QUARANTINE_NAME, ShardConfig, ShardWriter, iter_rows, read_manifest
from clip_data.sources import SourceError

# --------------------------------------------------------------------------- helpers


def _encode(width: int, height: int, fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _bomb() -> bytes:
    """A 1-bit PNG whose header declares 30000x30000 pixels, with no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 30_000, 30_000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _good(i: int) -> bytes:
    return _encode(16 + i % 5, 12 + i % 3, "PNG" if i % 2 else "JPEG", seed=i)


def _rec(key: str, image: bytes | None, caption: bytes | None, **kw: Any) -> RawRecord:
    return RawRecord(key=key, image=image, caption=caption, source="unit", **kw)


def mixed_records(n_good: int = 12) -> list[RawRecord]:
    """Good PNG/JPEG rows interleaved with every kind of bad row and exact duplicates."""
    good = [_rec(f"good-{i:03d}", _good(i), f"picture {i}".encode()) for i in range(n_good)]
    bad = [
        _rec("corrupt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"broken"),
        _rec("bomb", _bomb(), b"huge canvas"),
        _rec("latin1", _good(100), "caf\xe9".encode("latin-1")),
        _rec("empty-caption", _good(101), b"   \n"),
        _rec("no-image", None, b"caption only"),
        _rec("no-caption", _good(102), None),
        _rec("unsafe", None, None, problem="unsafe tar member name: '../etc/passwd'"),
    ]
    dups = [_rec("dup-of-0", _good(0), b"again"), _rec("dup-of-3", _good(3), b"again 3")]
    records: list[RawRecord] = []
    for i, record in enumerate(good):
        records.append(record)
        if i < len(bad):
            records.append(bad[i])
    return records + dups


EXPECTED_REASONS = {
    "caption_empty": 1,
    "caption_not_utf8": 1,
    "decode_error": 1,
    "decompression_bomb": 1,
    "missing_caption": 1,
    "missing_image": 1,
    "unsafe_member": 1,
}
LENIENT = IngestConfig(max_bad_fraction=1.0, workers=2, chunk_size=3)


def cheap_records(n: int) -> Iterator[RawRecord]:
    """Records that never reach an image decode (quarantined for their caption)."""
    for i in range(n):
        yield _rec(f"cheap-{i:05d}", b"x", b"")


def files(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.iterdir())}


# --------------------------------------------------------------------------- config


def test_config_validation_and_to_dict() -> None:
    for bad in ({"workers": 0}, {"chunk_size": 0}, {"max_bad_fraction": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            IngestConfig(**bad)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        IngestConfig(max_bad_fraction=math.nan)
    with pytest.raises(TypeError, match="CheckConfig"):
        IngestConfig(checks={"min_side": 3})  # type: ignore[arg-type]
    cfg = IngestConfig(checks=CheckConfig(min_side=4), workers=3, chunk_size=5)
    as_dict = cfg.to_dict()
    assert as_dict["checks"]["min_side"] == 4
    assert as_dict["shards"]["compression"] == "zstd"
    assert (as_dict["workers"], as_dict["chunk_size"], as_dict["max_bad_fraction"]) == (3, 5, 0.05)
    assert cfg.window == 3 * 5 * 4
    assert IngestConfig(workers=1).window == 1


# --------------------------------------------------------------------------- accounting


def test_mixed_stream_is_fully_accounted(tmp_path: Path) -> None:
    records = mixed_records()
    manifest = ingest_records(records, tmp_path / "out", LENIENT, source_desc={"uri": "mem"})
    counts = manifest["counts"]
    assert counts["read"] == len(records) == 21
    assert counts["accepted"] + counts["duplicates"] + counts["quarantined"] == counts["read"]
    assert (counts["accepted"], counts["duplicates"], counts["quarantined"]) == (12, 2, 7)
    assert counts["per_reason"] == EXPECTED_REASONS
    assert [d["key"] for d in manifest["duplicates"]] == ["dup-of-0", "dup-of-3"]
    assert [d["duplicate_of"] for d in manifest["duplicates"]] == ["good-000", "good-003"]
    rows = list(iter_rows(tmp_path / "out"))
    assert [r["key"] for r in rows] == [f"good-{i:03d}" for i in range(12)]  # source order
    assert all(r["image"] == _good(i) for i, r in enumerate(rows))  # original bytes
    quarantine = pq.read_table(tmp_path / "out" / QUARANTINE_NAME).to_pylist()
    assert [q["key"] for q in quarantine] == [
        *("corrupt", "bomb", "latin1", "empty-caption", "no-image", "no-caption", "unsafe")
    ]
    # execution-only settings stay out of the manifest; the source description goes in
    assert manifest["ingest_config"]["source"] == {"uri": "mem"}
    assert "workers" not in manifest["ingest_config"]
    assert manifest["ingest_config"]["max_bad_fraction"] == 1.0
    assert read_manifest(tmp_path / "out") == manifest


def test_worker_counts_give_identical_output(tmp_path: Path) -> None:
    records = mixed_records(20)
    small_shards = ShardConfig(target_shard_bytes=4_000, row_group_rows=4)
    one = ingest_records(
        records, tmp_path / "one", IngestConfig(shards=small_shards, max_bad_fraction=1, workers=1)
    )
    two = ingest_records(
        iter(records),
        tmp_path / "two",
        IngestConfig(shards=small_shards, max_bad_fraction=1, workers=2, chunk_size=2),
    )
    assert len(one["shards"]) > 1  # several shards, so the order across them is exercised
    assert one == two
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    first = ingest_records(mixed_records(), dest, LENIENT)
    before = files(dest)
    second = ingest_records(mixed_records(), dest, LENIENT)
    assert second == first
    assert files(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_empty_source(tmp_path: Path) -> None:
    manifest = ingest_records([], tmp_path / "out", IngestConfig(workers=2))
    assert manifest["counts"]["read"] == 0
    assert manifest["shards"] == []


# --------------------------------------------------------------------------- failures


def test_too_many_bad_rows_raise_after_writing(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    records = mixed_records()  # 7 of 21 quarantined: 33%
    with pytest.raises(IngestFailed) as info:
        ingest_records(records, dest, IngestConfig(max_bad_fraction=0.3, workers=1))
    failure = info.value
    assert failure.manifest["counts"]["quarantined"] == 7
    for reason in EXPECTED_REASONS:
        assert f"{reason}=1" in failure.summary
    assert "33.3%" in failure.summary and "30.0%" in failure.summary
    assert str(failure) == failure.summary
    # the output is there to inspect
    assert read_manifest(dest) == failure.manifest
    assert pq.read_table(dest / QUARANTINE_NAME).num_rows == 7
    # exactly at the limit is still a success
    ok = ingest_records(records, dest, IngestConfig(max_bad_fraction=7 / 21, workers=1))
    assert ok["counts"]["quarantined"] == 7


@pytest.mark.parametrize("workers", [1, 2])
def test_source_error_leaves_nothing_and_stops_workers(tmp_path: Path, workers: int) -> None:
    def failing() -> Iterator[RawRecord]:
        yield from mixed_records()[:10]
        raise SourceError("cannot read source 'x': connection reset")

    before = set(multiprocessing.active_children())
    with pytest.raises(SourceError, match="connection reset"):
        ingest_records(failing(), tmp_path / "out", IngestConfig(workers=workers, chunk_size=2))
    assert list(tmp_path.iterdir()) == []
    assert set(multiprocessing.active_children()) <= before  # the pool is shut down


# --------------------------------------------------------------------------- bounded read-ahead


@pytest.mark.parametrize(("workers", "chunk_size"), [(2, 4), (1, 64)])
def test_source_is_read_at_most_one_window_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, chunk_size: int
) -> None:
    written = 0

    class CountingWriter(ShardWriter):
        def add(self, row: Any) -> None:
            nonlocal written
            super().add(row)
            written += 1

        def reject(self, rejection: Any) -> None:
            nonlocal written
            super().reject(rejection)
            written += 1

    monkeypatch.setattr(ingest_module, "ShardWriter", CountingWriter)
    lags: list[int] = []

    def watched() -> Iterator[RawRecord]:
        for i, record in enumerate(cheap_records(300), start=1):
            lags.append(i - written)  # records handed out but not yet written
            yield record

    config = IngestConfig(max_bad_fraction=1.0, workers=workers, chunk_size=chunk_size)
    manifest = ingest_records(watched(), tmp_path / "out", config)
    assert manifest["counts"]["read"] == written == 300
    assert max(lags) == config.window  # reads ahead to fill the pipeline, never further


# --------------------------------------------------------------------------- progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_without_a_terminal_redrawn_on_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = IngestConfig(max_bad_fraction=1.0, workers=1)
    ingest_records(cheap_records(50), tmp_path / "q", config, progress=False)
    assert capsys.readouterr().err == ""

    ingest_records(cheap_records(50), tmp_path / "b", config, progress=True)
    err = capsys.readouterr().err
    assert "50 rows read" in err and "50 quarantined" in err and "rows/s" in err
    assert err.endswith("\n") and err.count("\n") == 1 and "\r" not in err  # a fast run: one

    clock = [0.0]
    monkeypatch.setattr(ingest_module.time, "monotonic", lambda: clock[0])

    def ticking(n: int) -> Iterator[RawRecord]:
        for i, record in enumerate(cheap_records(n), start=1):
            clock[0] = i  # row i is read (and, in-process, written) at i s
            yield record

    ingest_records(ticking(35), tmp_path / "a", config)  # progress=None, stderr not a TTY
    lines = capsys.readouterr().err.splitlines()
    # a line every 10 s (rows 10, 20, 30), then the closing line: plain lines for a log file
    assert [int(line.split(" rows read")[0].split()[-1]) for line in lines] == [10, 20, 30, 35]
    assert lines[-1].endswith(" rows/s, 35.0 s")

    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    clock[0] = 0.0

    def ticking_tty() -> Iterator[RawRecord]:
        for i, record in enumerate(cheap_records(40), start=1):
            clock[0] = i / 10  # row i is read (and, in-process, written) at 0.1 * i s
            yield record

    ingest_records(ticking_tty(), tmp_path / "c", config)  # progress=None and stderr is a TTY
    shown = tty.getvalue()
    # redrawn at most every 0.25 s: rows 1, 4, 7, ..., 40, then the final line
    drawn = [int(part.split(" rows read")[0].split()[-1]) for part in shown.split("\r")[1:]]
    assert drawn == [*range(1, 41, 3), 40]
    assert shown.endswith(" rows/s, 4.0 s\n")


# --------------------------------------------------------------------------- sources


def _csv_folder(root: Path, n_good: int, n_missing: int) -> Path:
    root.mkdir()
    lines = ["filepath,caption,extra_col"]
    for i in range(n_good):
        (root / f"img{i}.png").write_bytes(_encode(20, 20, "PNG", seed=500 + i))
        lines.append(f"img{i}.png,a picture number {i},{i}")
    lines += [f"gone{i}.png,missing image {i},x" for i in range(n_missing)]
    (root / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "data.csv"


def test_ingest_opens_sources(tmp_path: Path) -> None:
    csv_path = _csv_folder(tmp_path / "csv", n_good=5, n_missing=1)
    manifest = ingest(str(csv_path), tmp_path / "out", IngestConfig(max_bad_fraction=0.2))
    counts = manifest["counts"]
    assert (counts["read"], counts["accepted"], counts["quarantined"]) == (6, 5, 1)
    assert counts["per_reason"] == {"missing_image": 1}
    assert manifest["ingest_config"]["source"] == {
        "uri": str(csv_path),
        "kind": None,
        "options": {},
    }

    synthetic = ingest(
        "synthetic",
        tmp_path / "syn",
        IngestConfig(workers=1),
        "synthetic",
        train=6,
        test=2,
        image_size=16,
        plant=[1],
    )
    assert synthetic["counts"]["read"] == 9  # 6 train + 2 test + 1 planted near-duplicate
    assert synthetic["counts"]["per_split"] == {"test": 2, "train": 7}
    source = synthetic["ingest_config"]["source"]
    assert source["kind"] == "synthetic"
    assert source["options"] == {"image_size": 16, "plant": [1], "test": 2, "train": 6}
    # credentials never reach the manifest: storage options are recorded by name only
    described = ingest_module._describe_options(
        {"storage_options": {"key": "AKIA", "secret": "hunter2"}, "limit": 3}
    )
    assert described == {"limit": 3, "storage_options": ["key", "secret"]}

    with pytest.raises(SourceError):
        ingest(str(tmp_path / "nowhere.csv"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_ingest_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "syn"
    argv = ["ingest", "synthetic:train=6,test=2", str(dest), "--workers", "1"]
    assert main([*argv, "--option", "image_size=16", "--shard-mb", "1"]) == 0
    out, err = capsys.readouterr()
    assert "read 8, accepted 8, duplicates 0, quarantined 0" in out
    assert str(dest) in out and "shards: 1" in out
    (progress,) = err.splitlines()  # stderr is not a terminal: the closing progress line only
    assert progress.startswith("ingest: 8 rows read, 0 quarantined, ") and "\r" not in err
    assert read_manifest(dest)["ingest_config"]["source"]["options"] == {"image_size": 16}

    # too many bad rows: the summary on stderr, exit 1, output still written
    csv_path = _csv_folder(tmp_path / "csv", n_good=2, n_missing=2)
    bad_dest = tmp_path / "bad"
    assert main(["ingest", str(csv_path), str(bad_dest), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert "missing_image=2" in err and "50.0%" in err and "Traceback" not in err
    assert read_manifest(bad_dest)["counts"]["quarantined"] == 2
    # ...and a looser limit or threshold from the command line passes
    args = ["ingest", str(csv_path), str(bad_dest), "--workers", "1", "--max-bad-fraction", "0.5"]
    assert main(args) == 0
    assert main([*args, "--min-side", "32"]) == 1  # the 20x20 images are now too small
    assert "too_small=2" in capsys.readouterr().err

    # unreadable source or bad options: one line on stderr, exit 2
    for extra in (
        [str(tmp_path / "nowhere.csv"), str(tmp_path / "x")],
        ["synthetic", str(tmp_path / "x"), "--kind", "nope"],
        ["synthetic", str(tmp_path / "x"), "--option", "colour=red"],
        ["synthetic", str(tmp_path / "x"), "--workers", "0"],
    ):
        assert main(["ingest", *extra]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("clipops ingest: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_manifest_carries_the_dvc_dataset_version(tmp_path: Path) -> None:
    from clip_data.versioning import dvc_md5

    config = IngestConfig(workers=1, max_bad_fraction=1.0)
    first = ingest_records(mixed_records(), tmp_path / "a", config, progress=False)
    version = first["dataset_version"]["dvc_md5"]  # type: ignore[typeddict-item]
    assert version.endswith(".dir")
    # equal to DVC's md5 of the shards + quarantine without the manifest
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in files(tmp_path / "a").items():
        if name != "manifest.json":
            (copy / name).write_bytes(data)
    assert dvc_md5(copy) == version
    other = ingest_records(mixed_records(n_good=5), tmp_path / "b", config, progress=False)
    assert other["dataset_version"]["dvc_md5"] != version  # type: ignore[typeddict-item]


def test_images_are_kept_as_received_unless_reencoding_is_asked(tmp_path: Path) -> None:
    records = [_rec(f"k{i}", _good(i), b"a caption") for i in range(4)]
    kept = ingest_records(records, tmp_path / "kept", IngestConfig(workers=1), progress=False)
    assert kept["counts"]["accepted"] == 4
    rows = list(iter_rows(tmp_path / "kept"))
    assert [r["image"] for r in rows] == [r.image for r in records]
    for workers in (1, 2):
        config = IngestConfig(workers=workers, checks=CheckConfig(reencode="jpeg"))
        dest = tmp_path / f"jpeg-{workers}"
        ingest_records(records, dest, config, progress=False)
        rows = list(iter_rows(dest))
        assert len(rows) == 4
        for row, record in zip(rows, records, strict=True):
            assert row["image"].startswith(b"\xff\xd8\xff") and row["image"] != record.image
            assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()
            with Image.open(io.BytesIO(row["image"])) as img:
                assert (img.format, img.size) == ("JPEG", (row["width"], row["height"]))
    with pytest.raises(ValueError, match="reencode"):
        CheckConfig(reencode="gif")


def _pipe_max() -> int:
    try:
        return int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except OSError:
        return 0


@pytest.mark.skipif(
    _pipe_max() < ingest_module._PIPE_BYTES, reason="needs Linux pipes of _PIPE_BYTES"
)
def test_pool_pipes_hold_a_chunk_of_results() -> None:
    """A worker hands back a chunk of images in one write instead of ~15 of 64 KiB."""
    import fcntl

    executor = ingest_module._executor(2)
    try:
        queues: list[Any] = [executor._result_queue, executor._call_queue]  # type: ignore[attr-defined]
        for queue in queues:
            size = fcntl.fcntl(queue._reader.fileno(), fcntl.F_GETPIPE_SZ)
            assert size >= ingest_module._PIPE_BYTES
    finally:
        executor.shutdown()
