"""bench/data_startup.py: the start-up benchmark measures what it says, on disk and on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import data_startup


def test_both_sizes_on_disk_and_s3_with_the_same_units_and_honest_ratios(tmp_path: Path) -> None:
    results = data_startup.run([3, 12], rounds=1, s3=True, root=tmp_path)
    assert [(r.where, r.shards) for r in results] == [
        ("local", 3),
        ("s3", 3),
        ("local", 12),
        ("s3", 12),
    ]
    for r in results:
        assert r.units == 4 * r.shards  # the template shard has 4 row groups
        assert r.manifest_s > 0 and r.scan_s > 0
        assert r.ratio == pytest.approx(r.scan_s / r.manifest_s)
    table = data_startup.table(results)
    assert table.count("\n") == 1 + len(results) and "| s3 | 12 |" in table


def test_the_manifest_path_reads_no_shard_and_the_scan_reads_every_one(tmp_path: Path) -> None:
    template, manifest = data_startup.template_shard(tmp_path)
    dest = tmp_path / "shards"
    data_startup.replicate(template, manifest, dest, 5)
    before = data_startup.from_manifest(str(dest))
    assert len(before) == 20 and before[-1]["url"].endswith("part-00004.parquet")
    for shard in dest.glob("*.parquet"):
        shard.unlink()
    assert data_startup.from_manifest(str(dest)) == before  # no Parquet file was opened
    with pytest.raises(FileNotFoundError):
        data_startup.from_footers(str(dest))


def test_a_manifest_that_disagrees_with_the_footers_is_not_timed(tmp_path: Path) -> None:
    template, manifest = data_startup.template_shard(tmp_path)
    dest = tmp_path / "shards"
    written = data_startup.replicate(template, manifest, dest, 2)
    written["shards"][1]["row_groups"] = [16, 16]
    written["shards"][1].pop("row_group_splits")
    (dest / "manifest.json").write_text(json.dumps(written), encoding="utf-8")
    with pytest.raises(RuntimeError, match="differ from the footers"):
        data_startup.time_startup("local", str(dest), 2, rounds=1)


def test_sizes_and_rounds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        data_startup.parse_args(["--shards", "0"])
    assert exc.value.code == 2 and "at least 1" in capsys.readouterr().err
