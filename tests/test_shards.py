"""Tests for clip_data.shards: rollover, round trip, duplicates, quarantine, determinism,
atomic replacement and bounded memory."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_data.checks import CheckConfig, CheckedRecord, Rejection, check_record
from clip_data.records import RawRecord
from clip_data.shards import (
    MANIFEST_NAME,
    QUARANTINE_NAME,
    ROW_SCHEMA,
    SCHEMA_VERSION,
    ShardConfig,
    ShardWriter,
    iter_rows,
    read_manifest,
    row_schema,
)


def _row(i: int, size: int = 2_000, seed: int = 0, split: str = "train") -> CheckedRecord:
    """A CheckedRecord whose image is ``size`` deterministic random bytes (never decoded)."""
    image = random.Random(seed * 1_000_003 + i).randbytes(size)
    return CheckedRecord(
        key=f"key-{i:06d}",
        image=image,
        caption=f"caption number {i} ✓",
        width=10 + i,
        height=20 + i,
        sha256=hashlib.sha256(image).hexdigest(),
        source="unit",
        split=split,
        extra={"z": i, "a": [1, "two"], "url": f"http://example.com/{i}"},
    )


def _as_dict(row: CheckedRecord) -> dict[str, Any]:
    return {
        "key": row.key,
        "image": row.image,
        "caption": row.caption,
        "width": row.width,
        "height": row.height,
        "sha256": row.sha256,
        "source": row.source,
        "split": row.split,
        "extra": row.extra,
    }


def _rejection(i: int, reason: str = "decode_error") -> Rejection:
    return Rejection(key=f"bad-{i}", source="unit", split="train", reason=reason, detail=f"d{i}")


def _write(
    dest: Path,
    rows: list[CheckedRecord],
    rejections: Sequence[Rejection] = (),
    config: ShardConfig | None = None,
) -> dict[str, Any]:
    with ShardWriter(
        dest, config or ShardConfig(), ingest_config={"source": "unit", "b": 2, "a": 1}
    ) as writer:
        for row in rows:
            writer.add(row)
        for rejection in rejections:
            writer.reject(rejection)
    assert writer.manifest is not None
    return dict(writer.manifest)


def _snapshot(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.iterdir())}


SMALL = ShardConfig(target_shard_bytes=40_000, row_group_rows=8)
#: The shard schema of ``_row``'s extras.
EXPECTED_SCHEMA = row_schema({"a": "json", "url": "string", "z": "int64"})


def test_rollover_and_round_trip(tmp_path: Path) -> None:
    rows = [_row(i, split=("train", "val", "test")[i % 3]) for i in range(100)]
    dest = tmp_path / "out"
    manifest = _write(dest, rows, config=SMALL)

    shards = manifest["shards"]
    assert [s["file"] for s in shards] == [f"part-{i:05d}.parquet" for i in range(len(shards))]
    # ~200 kB of incompressible rows into 40 kB shards
    assert len(shards) >= 5
    assert sum(s["rows"] for s in shards) == 100
    for shard in shards[:-1]:
        # closed before the row that would pass the target; footer etc. is small
        assert shard["bytes"] <= SMALL.target_shard_bytes * 1.15
        assert shard["bytes"] >= SMALL.target_shard_bytes * 0.75
    for shard in shards:
        md = pq.ParquetFile(dest / shard["file"]).metadata
        assert md.num_rows == shard["rows"]
        assert all(
            md.row_group(g).num_rows <= SMALL.row_group_rows for g in range(md.num_row_groups)
        )
        assert pq.read_schema(dest / shard["file"]).equals(EXPECTED_SCHEMA, check_metadata=True)

    assert list(iter_rows(dest)) == [_as_dict(r) for r in rows]
    assert manifest["counts"]["per_split"] == {"test": 33, "train": 34, "val": 33}
    assert read_manifest(dest) == manifest


def test_single_oversized_row_gets_its_own_shard(tmp_path: Path) -> None:
    rows = [_row(0, size=100), _row(1, size=50_000), _row(2, size=100)]
    manifest = _write(tmp_path / "out", rows, config=SMALL)
    assert [s["rows"] for s in manifest["shards"]] == [1, 1, 1]


def test_extra_stored_as_typed_columns(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    manifest = _write(dest, [_row(0), _row(1)])
    assert manifest["extra_columns"] == {"a": "json", "url": "string", "z": "int64"}
    table = pq.read_table(dest / "part-00000.parquet")
    extra_names = ["extra.a", "extra.url", "extra.z", "extra_json"]
    assert table.schema.names == [*ROW_SCHEMA.names[:-1], *extra_names]
    assert table.column("extra.z").type == pa.int64()
    assert table.column("extra.z").to_pylist() == [0, 1]
    assert table.column("extra.url").to_pylist() == [f"http://example.com/{i}" for i in (0, 1)]
    assert table.column("extra.a").to_pylist() == ['[1,"two"]'] * 2  # a list: JSON text
    assert table.column("extra_json").to_pylist() == [None, None]  # nothing left over


def test_duplicates_kept_once_and_recorded(tmp_path: Path) -> None:
    first = _row(1)
    dup = CheckedRecord(**{**_as_dict(first), "key": "copy-of-1", "caption": "other caption"})
    rows = [_row(0), first, _row(2), dup, _row(3), dup]
    dest = tmp_path / "out"
    manifest = _write(dest, rows)
    assert manifest["duplicates"] == [
        {"key": "copy-of-1", "duplicate_of": "key-000001", "source": "unit"},
        {"key": "copy-of-1", "duplicate_of": "key-000001", "source": "unit"},
    ]
    counts = manifest["counts"]
    assert (counts["read"], counts["accepted"], counts["duplicates"]) == (6, 4, 2)
    assert [r["key"] for r in iter_rows(dest)] == [f"key-{i:06d}" for i in range(4)]


def test_quarantine_contents_and_counts(tmp_path: Path) -> None:
    rejections = [_rejection(0), _rejection(1, "too_small"), _rejection(2)]
    dest = tmp_path / "out"
    manifest = _write(dest, [_row(0), _row(1)], rejections)
    table = pq.read_table(dest / QUARANTINE_NAME)
    assert table.to_pylist() == [
        {"key": r.key, "source": r.source, "split": r.split, "reason": r.reason, "detail": r.detail}
        for r in rejections
    ]
    counts = manifest["counts"]
    assert counts["quarantined"] == 3
    assert counts["per_reason"] == {"decode_error": 2, "too_small": 1}
    assert counts["read"] == counts["accepted"] + counts["duplicates"] + counts["quarantined"] == 5
    assert manifest["quarantine"]["rows"] == 3


def test_only_rejections_gives_no_shards(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    manifest = _write(dest, [], [_rejection(0)])
    assert manifest["shards"] == []
    assert list(iter_rows(dest)) == []
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST_NAME, QUARANTINE_NAME]


def test_manifest_checksums_and_sizes_match_files(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    manifest = _write(dest, [_row(i) for i in range(50)], [_rejection(0)], config=SMALL)
    on_disk = json.loads((dest / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["ingest_config"] == {"a": 1, "b": 2, "source": "unit"}
    listed = {s["file"] for s in on_disk["shards"]} | {QUARANTINE_NAME, MANIFEST_NAME}
    assert {p.name for p in dest.iterdir()} == listed
    for shard in on_disk["shards"]:
        data = (dest / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data)
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    qdata = (dest / QUARANTINE_NAME).read_bytes()
    assert on_disk["quarantine"]["sha256"] == hashlib.sha256(qdata).hexdigest()


def test_file_md5s_are_the_md5s_of_the_published_files(tmp_path: Path) -> None:
    """The hashes taken while writing (never read back) are those of the files on disk."""
    dest = tmp_path / "out"
    with ShardWriter(dest, SMALL) as writer:
        for i in range(50):
            writer.add(_row(i))
        writer.reject(_rejection(0))
    names = {p.name for p in dest.iterdir()} - {MANIFEST_NAME}
    assert len(names) > 2  # several shards and the quarantine
    assert writer.file_md5s == {
        name: hashlib.md5((dest / name).read_bytes()).hexdigest() for name in names
    }


def test_idempotent_byte_identical(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(60)] + [_row(3)]
    rejections = [_rejection(i) for i in range(5)]
    a, b = tmp_path / "a", tmp_path / "b"
    manifest_a = _write(a, rows, rejections, SMALL)
    first = _snapshot(a)
    manifest_b = _write(b, rows, rejections, SMALL)
    assert manifest_a == manifest_b
    assert _snapshot(b) == first
    # and again into the same directory, replacing it
    _write(a, rows, rejections, SMALL)
    assert _snapshot(a) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_different_input_gives_different_output(tmp_path: Path) -> None:
    """Guard for the idempotence test: the comparison does see content changes."""
    _write(tmp_path / "a", [_row(i) for i in range(5)])
    _write(tmp_path / "b", [_row(i, seed=1) for i in range(5)])
    assert _snapshot(tmp_path / "a") != _snapshot(tmp_path / "b")


def test_replace_shrinks_output(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    _write(dest, [_row(i) for i in range(100)], config=SMALL)
    manifest = _write(dest, [_row(0)], config=SMALL)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["part-00000.parquet", QUARANTINE_NAME, MANIFEST_NAME]
    )
    assert manifest["counts"]["accepted"] == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"extra": {"x": object()}},
        {"width": -1},
        {"sha256": "0" * 64},
        {"split": "nope"},
    ],
)
def test_failure_mid_write_keeps_previous_output(tmp_path: Path, bad: dict[str, Any]) -> None:
    dest = tmp_path / "out"
    _write(dest, [_row(i) for i in range(30)], [_rejection(0)], SMALL)
    before = _snapshot(dest)
    malformed = CheckedRecord(**{**_as_dict(_row(99)), **bad})
    with pytest.raises((ValueError, TypeError)), ShardWriter(dest, SMALL) as writer:
        for i in range(40):  # enough to roll over shards inside the temp dir
            writer.add(_row(1000 + i))
        writer.reject(_rejection(5))
        tmp = writer.temp_dir
        assert tmp.is_dir() and tmp.parent == tmp_path
        writer.add(malformed)
    assert _snapshot(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        writer.add(_row(0))


def test_failure_on_first_write_creates_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "new"
    with pytest.raises(ValueError), ShardWriter(dest) as writer:
        writer.add(CheckedRecord(**{**_as_dict(_row(0)), "sha256": "x"}))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    dest = tmp_path / "precious"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ShardWriter(dest)
    assert (dest / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_rejects_remote_destination() -> None:
    with pytest.raises(ValueError, match="local"):
        ShardWriter("s3://bucket/prefix")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_shard_bytes": 0},
        {"row_group_rows": -1},
        {"row_group_rows": True},
        {"compression": "lzma"},
    ],
)
def test_shard_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ShardConfig(**kwargs)


def test_read_manifest_rejects_unknown_schema_version(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    _write(dest, [_row(0)])
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 99
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema_version"):
        read_manifest(dest)


def test_bounded_memory(tmp_path: Path) -> None:
    config = ShardConfig(target_shard_bytes=1 << 20, row_group_rows=1024)
    n, size = 3_000, 20_000  # ~60 MB streamed through the writer

    def rows() -> Iterator[CheckedRecord]:
        rng = np.random.default_rng(0)
        for i in range(n):
            image = rng.bytes(size)
            yield CheckedRecord(
                key=f"k{i}",
                image=image,
                caption="c",
                width=1,
                height=1,
                sha256=hashlib.sha256(image).hexdigest(),
                source="s",
                split="train",
                extra={},
            )

    dest = tmp_path / "out"
    tracemalloc.start()
    try:
        with ShardWriter(dest, config) as writer:
            for row in rows():
                writer.add(row)
                assert writer.buffered_rows <= config.row_group_rows
                assert writer.buffered_bytes <= config.target_shard_bytes
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak traced memory {peak / 2**20:.2f} MiB")
    assert peak < 8 << 20, f"peak traced memory {peak / 2**20:.1f} MiB"  # vs ~60 MB of rows
    manifest = read_manifest(dest)
    assert manifest["counts"]["accepted"] == n
    assert len(manifest["shards"]) >= 50


def test_end_to_end_with_check_record(tmp_path: Path) -> None:
    """Every raw record is accounted for: accepted + duplicates + quarantined == read."""

    def png(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    raws = [
        RawRecord(key="a", image=png(0), caption=b"one", source="s"),
        RawRecord(key="b", image=png(1), caption=b"two", source="s", split="val"),
        RawRecord(key="c", image=png(0), caption=b"dup", source="s"),
        RawRecord(key="d", image=b"junk", caption=b"bad", source="s"),
        RawRecord(key="e", image=None, caption=b"x", source="s"),
        RawRecord(key="f", image=png(2), caption=b"caf\xe9", source="s"),
        RawRecord(key="g", image=png(3), caption=b"x", source="s", problem="unsafe path"),
    ]
    dest = tmp_path / "out"
    config = CheckConfig()
    with ShardWriter(dest) as writer:
        for raw in raws:
            result = check_record(raw, config)
            if isinstance(result, Rejection):
                writer.reject(result)
            else:
                writer.add(result)
    counts = read_manifest(dest)["counts"]
    assert counts["read"] == len(raws)
    assert (counts["accepted"], counts["duplicates"], counts["quarantined"]) == (2, 1, 4)
    assert counts["per_split"] == {"train": 1, "val": 1}
    assert counts["per_reason"] == {
        "caption_not_utf8": 1,
        "decode_error": 1,
        "missing_image": 1,
        "unsafe_member": 1,
    }
    back = list(iter_rows(dest))
    assert [(r["key"], r["width"], r["height"]) for r in back] == [("a", 24, 16), ("b", 24, 16)]
    assert back[0]["image"] == raws[0].image


def test_bad_ingest_config_fails_before_creating_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ingest_config"):
        ShardWriter(tmp_path / "out", ingest_config={"when": object()})
    assert list(tmp_path.iterdir()) == []


def test_published_directory_is_not_private(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    _write(dest, [_row(0)])
    assert dest.stat().st_mode & 0o777 == 0o755


def test_format_names_are_re_exported() -> None:
    """The writer module still offers every name callers import from it."""
    import clip_data.shard_format as fmt
    from clip_data import shards

    for name in fmt.__all__:
        if not name.startswith(("Parquet", "canonical", "file_")):
            assert getattr(shards, name) is getattr(fmt, name), name
