"""Tests of clip_data.validate (Great Expectations dataset validation) and `clipops validate`.

Importing great_expectations takes 6-17 s, so datasets and validation runs are module-scoped
and the number of ``validate_dataset`` calls is kept small.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_cli.main import main
from clip_data.checks import CheckConfig, Rejection, check_record
from clip_data.records import RawRecord
from clip_data.shards import MANIFEST_NAME, ROW_SCHEMA, ShardConfig, ShardWriter, shard_name
from clip_data.validate import (
    FRAME_COLUMNS,
    REPORT_NAME,
    DatasetError,
    ValidationConfig,
    ValidationReport,
    metadata_frame,
    validate_dataset,
)

N_ROWS = 12
# Rows whose caption is 11+ chars: every row ("caption #00" ...).
LONG_CAPTION_LIMIT = 5


def _png(width: int, height: int, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 7)).save(buf, "PNG")
    return buf.getvalue()


def _build(dest: Path, n: int = N_ROWS) -> Path:
    """A small ingest output: n distinct images in 3 shards of 4 rows (one row group each)."""
    cfg = CheckConfig()
    with ShardWriter(dest, ShardConfig(row_group_rows=4, target_shard_bytes=800)) as writer:
        for i in range(n):
            record = RawRecord(
                key=f"key-{i:03d}",
                image=_png(16 + i, 20, i * 10),
                caption=f"caption #{i:02d}".encode(),
                source="unit",
                split=("train", "val", "test")[i % 3],
            )
            result = check_record(record, cfg)
            assert not isinstance(result, Rejection), result
            writer.add(result)
    return dest


def _failing(report: ValidationReport) -> set[tuple[str, str | None]]:
    return {(r["name"], r["column"]) for r in report.results if not r["success"]}


def _rewrite_shard(dest: Path, index: int, edit: Any) -> None:
    """Rewrite shard ``index`` after ``edit(columns)`` changed its python column lists."""
    path = dest / shard_name(index)
    table = pq.read_table(path)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    edit(columns)
    arrays = [pa.array(columns[f.name], type=f.type) for f in ROW_SCHEMA]
    pq.write_table(pa.Table.from_arrays(arrays, schema=ROW_SCHEMA), path)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("good") / "ds")


@pytest.fixture(scope="module")
def good_report(good: Path) -> ValidationReport:
    return validate_dataset(good)


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shard 0 rewritten: duplicated key, invalid split, corrupted image, bad UTF-8 caption."""
    dest = _build(tmp_path_factory.mktemp("tampered") / "ds")
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert len(manifest["shards"]) >= 2  # tampering one shard leaves the others intact
    shard0_rows = manifest["shards"][0]["rows"]
    assert shard0_rows >= 4

    def edit(cols: dict[str, list[Any]]) -> None:
        cols["key"][1] = cols["key"][0]  # duplicate key
        cols["split"][2] = "holdout"  # not an allowed split
        image = bytearray(cols["image"][0])  # row 0 is always in the decode sample
        image[len(image) // 2 :] = b"\x00" * (len(image) - len(image) // 2)
        cols["image"][0] = bytes(image)

    _rewrite_shard(dest, 0, edit)
    # Invalid UTF-8 in a string column: write the bytes as binary, then view them as string.
    path = dest / shard_name(0)
    table = pq.read_table(path)
    raw = table.column("caption").to_pylist()
    raw[3] = b"caption \xff\xfe"
    bad = pa.array([r if isinstance(r, bytes) else r.encode() for r in raw], pa.binary())
    table = table.set_column(
        table.schema.get_field_index("caption"),
        ROW_SCHEMA.field("caption"),
        bad.view(pa.string()),
    )
    pq.write_table(table, path)
    return dest


# ------------------------------------------------------------------- config (no GX)


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = ValidationConfig(max_caption_chars=10, allowed_splits=("train",), sample_size=3)
    assert ValidationConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict()))["allowed_splits"] == ["train"]
    with pytest.raises(ValueError, match="bogus_key") as info:
        ValidationConfig.from_dict({"max_side": 10, "bogus_key": 1})
    assert "max_side" not in str(info.value).split("(known")[0]


@pytest.mark.parametrize(
    "bad",
    [
        {"min_caption_chars": 10, "max_caption_chars": 5},
        {"min_side": -1},
        {"max_aspect": 0.5},
        {"max_aspect": float("inf")},
        {"sample_size": True},
        {"min_success_fraction": 0.0},
        {"min_success_fraction": 1.5},
        {"allowed_splits": []},
        {"allowed_splits": "train"},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ValidationConfig.from_dict(bad)


def test_config_from_yaml_and_json_files(tmp_path: Path) -> None:
    yml = tmp_path / "v.yaml"
    yml.write_text("max_caption_chars: 7\nallowed_splits: [train, val]\nmax_aspect: 3\n")
    cfg = ValidationConfig.from_file(yml)
    assert cfg.max_caption_chars == 7
    assert cfg.allowed_splits == ("train", "val")
    assert cfg.max_aspect == 3
    assert cfg.min_side == ValidationConfig().min_side
    js = tmp_path / "v.json"
    js.write_text(json.dumps({"sample_size": 0}))
    assert ValidationConfig.from_file(js) == ValidationConfig(sample_size=0)
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert ValidationConfig.from_file(empty) == ValidationConfig()
    bad = tmp_path / "bad.yml"
    bad.write_text("sample_siz: 3\n")
    with pytest.raises(ValueError, match="sample_siz"):
        ValidationConfig.from_file(bad)
    broken = tmp_path / "broken.yml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        ValidationConfig.from_file(broken)


# ------------------------------------------------------------------- metadata frame (no GX)


def test_metadata_frame_columns_and_sample(good: Path) -> None:
    frame = metadata_frame(good, sample_size=4)
    assert tuple(frame.columns) == FRAME_COLUMNS
    assert len(frame) == N_ROWS
    assert list(frame["key"]) == [f"key-{i:03d}" for i in range(N_ROWS)]
    assert list(frame["width"]) == [16 + i for i in range(N_ROWS)]
    assert set(frame["height"]) == {20}
    assert frame["aspect"].iloc[0] == pytest.approx(20 / 16)
    assert list(frame["caption_chars"]) == [len("caption #00")] * N_ROWS
    assert frame["caption_utf8_ok"].tolist() == [True] * N_ROWS
    sampled = [i for i, v in enumerate(frame["decode_ok"]) if v is not None]
    assert sampled == [0, 3, 6, 9]  # evenly spaced, deterministic
    assert all(frame["decode_ok"].iloc[sampled])
    full = metadata_frame(good, sample_size=1000)
    assert full["decode_ok"].tolist() == [True] * N_ROWS


def test_metadata_frame_rejects_non_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        metadata_frame(tmp_path / "missing")
    with pytest.raises(DatasetError, match=MANIFEST_NAME):
        metadata_frame(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DatasetError, match="invalid manifest"):
        metadata_frame(tmp_path)


# ------------------------------------------------------------------- validate_dataset (GX)


def test_good_dataset_passes_and_writes_json(good: Path, good_report: ValidationReport) -> None:
    report = good_report
    assert report.success, report.summary()
    assert report.rows == N_ROWS
    assert _failing(report) == set()
    names = {(r["name"], r["column"]) for r in report.results}
    for expected in [
        ("expect_table_columns_to_match_set", None),
        ("expect_column_values_to_not_be_null", "key"),
        ("expect_column_values_to_not_be_null", "caption"),
        ("expect_column_values_to_be_unique", "key"),
        ("expect_column_values_to_be_between", "caption_chars"),
        ("expect_column_values_to_be_between", "aspect"),
        ("expect_column_values_to_be_in_set", "split"),
        ("expect_column_values_to_be_in_set", "decode_ok"),
        ("expect_column_values_to_be_in_set", "caption_utf8_ok"),
        ("manifest_counts_match_rows", None),
        ("shard_sha256_matches_manifest", None),
    ]:
        assert expected in names
    assert "passed" in report.summary()
    assert "FAIL" not in report.summary()
    written = json.loads((good / REPORT_NAME).read_text())
    assert written["success"] is True
    assert written["rows"] == N_ROWS
    assert written["sampled_rows"] == N_ROWS  # default sample_size 256 > rows
    assert written["config"] == ValidationConfig().to_dict()
    assert written["gx_result"]["success"] is True
    assert len(written["gx_result"]["results"]) == len(report.results) - 3


def test_thresholds_change_the_outcome(good: Path, good_report: ValidationReport) -> None:
    assert good_report.success
    strict = ValidationConfig(max_caption_chars=LONG_CAPTION_LIMIT, allowed_splits=("train",))
    report = validate_dataset(good, strict)
    assert not report.success
    assert _failing(report) == {
        ("expect_column_values_to_be_between", "caption_chars"),
        ("expect_column_values_to_be_in_set", "split"),
    }
    by_column = {r["column"]: r for r in report.results if not r["success"]}
    assert by_column["caption_chars"]["unexpected_count"] == N_ROWS
    assert by_column["split"]["unexpected_count"] == N_ROWS * 2 // 3
    assert set(by_column["split"]["examples"]) <= {"val", "test"}
    summary = report.summary()
    assert "FAILED" in summary
    assert "expect_column_values_to_be_between(caption_chars)" in summary
    assert "expect_column_values_to_be_in_set(split)" in summary
    assert "not_be_null" not in summary  # passing expectations are not listed
    assert json.loads((good / REPORT_NAME).read_text())["success"] is False
    # "mostly": a third of the rows are train, so 0.3 of rows satisfy the split expectation.
    loose = ValidationConfig(allowed_splits=("train",), min_success_fraction=0.3)
    assert validate_dataset(good, loose).success


def test_tampered_shard_fails_the_right_expectations(tampered: Path) -> None:
    report = validate_dataset(tampered, ValidationConfig(sample_size=4))
    assert not report.success
    assert _failing(report) == {
        ("expect_column_values_to_be_unique", "key"),
        ("expect_column_values_to_be_in_set", "split"),
        ("expect_column_values_to_be_in_set", "decode_ok"),
        ("expect_column_values_to_be_in_set", "caption_utf8_ok"),
        ("manifest_counts_match_rows", None),  # per-split counts no longer agree
        ("shard_sha256_matches_manifest", None),
    }
    by = {(r["name"], r["column"]): r for r in report.results}
    assert by[("expect_column_values_to_be_unique", "key")]["examples"] == ["key-000"] * 2
    assert by[("expect_column_values_to_be_in_set", "split")]["examples"] == ["holdout"]
    assert by[("expect_column_values_to_be_in_set", "decode_ok")]["unexpected_count"] == 1
    assert by[("shard_sha256_matches_manifest", None)]["examples"] == [shard_name(0)]
    summary = report.summary()
    for name in ("be_unique(key)", "in_set(split)", "in_set(decode_ok)", "caption_utf8_ok"):
        assert name in summary
    json.loads((tampered / REPORT_NAME).read_text())  # still valid JSON


# ------------------------------------------------------------------- CLI


def test_cli_exit_codes(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], good_report: ValidationReport
) -> None:
    assert good_report.success
    assert main(["validate", str(good)]) == 0
    out, err = capsys.readouterr()
    assert "validation passed" in out
    assert err == ""

    cfg = tmp_path / "strict.yaml"
    cfg.write_text(f"max_caption_chars: {LONG_CAPTION_LIMIT}\n")
    assert main(["validate", str(good), "--config", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert "caption_chars" in err
    assert "Traceback" not in err

    assert main(["validate", str(tmp_path / "nope")]) == 2
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1
    assert "not a directory" in err

    assert main(["validate", str(tmp_path)]) == 2  # a directory without a manifest
    _, err = capsys.readouterr()
    assert MANIFEST_NAME in err

    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text('{"unknown_threshold": 1}')
    assert main(["validate", str(good), "--config", str(bad_cfg)]) == 2
    _, err = capsys.readouterr()
    assert "unknown_threshold" in err


def test_missing_column_manifest_mismatch_and_missing_shard(tmp_path: Path) -> None:
    dest = _build(tmp_path / "ds")
    shard = dest / shard_name(1)
    pq.write_table(pq.read_table(shard).drop_columns(["caption"]), shard)
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    manifest["counts"]["accepted"] = N_ROWS + 1
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = validate_dataset(dest, ValidationConfig(sample_size=0))
    assert _failing(report) == {
        ("expect_column_values_to_not_be_null", "caption"),
        ("expect_column_values_to_not_be_null", "caption_chars"),
        ("expect_column_values_to_not_be_null", "caption_utf8_ok"),
        ("shard_schema_matches", None),
        ("shard_sha256_matches_manifest", None),
        ("manifest_counts_match_rows", None),
    }
    by = {(r["name"], r["column"]): r for r in report.results}
    assert by[("expect_column_values_to_not_be_null", "caption")]["unexpected_count"] == 4
    assert f"accepted={N_ROWS + 1}" in by[("manifest_counts_match_rows", None)]["examples"][0]
    shard.unlink()
    with pytest.raises(DatasetError, match=shard_name(1)):
        validate_dataset(dest)
    assert main(["validate", str(dest)]) == 2


def test_defaults_follow_the_ingest_checks() -> None:
    """One source of truth: the validation defaults are the ingest check defaults."""
    from clip_data.records import SPLITS

    checks, validation = CheckConfig(), ValidationConfig()
    for name in ("min_caption_chars", "max_caption_chars", "min_side", "max_side", "max_aspect"):
        assert getattr(validation, name) == getattr(checks, name), name
    assert validation.allowed_splits == SPLITS
