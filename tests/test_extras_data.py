"""Extra metadata as typed Parquet columns: the inference rule, leftovers, exact round trip,
and the columns an ingest from a CSV with extra columns produces."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_data.checks import CheckedRecord
from clip_data.extras import infer_extra_types, merge_extra, split_extra
from clip_data.ingest import IngestConfig, ingest
from clip_data.shards import ShardConfig, ShardWriter, iter_rows, read_manifest
from clip_data.validate import validate_dataset


def _row(i: int, extra: dict[str, Any]) -> CheckedRecord:
    image = f"image {i}".encode()
    return CheckedRecord(
        key=f"k{i:03d}",
        image=image,
        caption="c",
        width=8,
        height=8,
        sha256=hashlib.sha256(image).hexdigest(),
        source="unit",
        split="train",
        extra=extra,
    )


def test_inference_rule() -> None:
    sample: list[dict[str, Any]] = [
        {"n": 1, "f": 0.5, "b": True, "s": "x", "mixed": 1, "nums": 1, "nothing": None},
        {"n": 2, "f": 1.5, "b": False, "s": "y", "mixed": "one", "nums": 2.0, "nothing": None},
        {"n": None, "list": [1], "obj": {"a": 1}, "big": 2**70, "nan": float("nan")},
    ]
    assert infer_extra_types(sample) == {
        "b": "bool",
        "big": "json",  # outside int64
        "f": "float64",
        "list": "json",
        "mixed": "json",  # str and int: inconsistent
        "n": "int64",  # a null does not change the type
        "nan": "json",  # not finite
        "nothing": "json",  # only nulls
        "nums": "json",  # int and float are different types
        "obj": "json",
        "s": "string",
    }


def test_split_and_merge_round_trip_with_leftovers() -> None:
    types = {"n": "int64", "s": "string", "j": "json"}
    extra = {"n": "not a number", "s": "text", "j": None, "late": [1, 2], "none": None}
    values, leftover = split_extra(extra, types, "row")
    assert values == [None, "text", "null"]
    assert leftover == '{"late":[1,2],"n":"not a number","none":null}'
    cells = [(key, kind, value) for (key, kind), value in zip(types.items(), values, strict=True)]
    assert merge_extra(cells, leftover) == extra
    assert split_extra({}, types, "row") == ([None, None, None], None)
    with pytest.raises(ValueError, match="row"):
        split_extra({"late": object()}, types, "row")


def test_schema_is_fixed_by_the_first_row_group(tmp_path: Path) -> None:
    """Keys and values the first row group did not show go to extra_json, typed where seen."""
    first = [_row(i, {"label": f"l{i}", "n": i}) for i in range(4)]
    later = [
        _row(4, {"label": "l4", "n": "many", "new": True}),  # mistyped value, unseen key
        _row(5, {"n": 5}),  # a missing key is a null cell
        _row(6, {"label": None, "n": 6}),  # an explicit null is kept as such
    ]
    rows = first + later
    dest = tmp_path / "out"
    config = ShardConfig(row_group_rows=4, target_shard_bytes=200)  # several shards
    with ShardWriter(dest, config) as writer:
        for row in rows:
            writer.add(row)
    manifest = read_manifest(dest)
    assert manifest["extra_columns"] == {"label": "string", "n": "int64"}
    assert len(manifest["shards"]) > 1
    tables = [pq.read_table(dest / s["file"]) for s in manifest["shards"]]
    table = pa.concat_tables(tables)  # every shard has the same schema
    assert table.column("extra.n").to_pylist() == [0, 1, 2, 3, None, 5, 6]
    assert table.column("extra.label").to_pylist() == ["l0", "l1", "l2", "l3", "l4", None, None]
    assert table.column("extra_json").to_pylist() == [None] * 4 + [
        '{"n":"many","new":true}',
        None,
        '{"label":null}',
    ]
    assert [r["extra"] for r in iter_rows(dest)] == [r.extra for r in rows]


def test_bad_extra_is_rejected_before_and_after_the_schema_is_fixed(tmp_path: Path) -> None:
    config = ShardConfig(row_group_rows=2)
    for before in (0, 3):
        with pytest.raises(ValueError, match="extra"), ShardWriter(tmp_path / "o", config) as w:
            for i in range(before):
                w.add(_row(i, {"n": i}))
            w.add(_row(99, {"n": float("inf")}))
        assert not (tmp_path / "o").exists()


def test_surrogate_escaped_text_round_trips(tmp_path: Path) -> None:
    """CSV cells that were not UTF-8 come as surrogate escapes; they survive as JSON."""
    odd = b"caf\xe9".decode("utf-8", "surrogateescape")
    rows = [_row(0, {"note": odd}), _row(1, {"note": "plain"})]
    with ShardWriter(tmp_path / "out") as writer:
        for row in rows:
            writer.add(row)
    assert read_manifest(tmp_path / "out")["extra_columns"] == {"note": "json"}
    assert [r["extra"] for r in iter_rows(tmp_path / "out")] == [r.extra for r in rows]


def test_csv_extra_columns_become_typed_columns(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = ["filepath,caption,label"]
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (16 + i, 16), (i * 50, 0, 0)).save(buf, format="PNG")
        (src / f"{i}.png").write_bytes(buf.getvalue())
        lines.append(f"{i}.png,picture {i},class-{i % 2}")
    (src / "data.csv").write_text("\n".join(lines) + "\n")
    manifest = ingest(str(src / "data.csv"), tmp_path / "out", IngestConfig(workers=1))
    assert manifest["extra_columns"] == {"image_file": "string", "label": "string"}
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.column("extra.label").to_pylist() == ["class-0", "class-1", "class-0"]
    rows = list(iter_rows(tmp_path / "out"))
    assert [r["extra"] for r in rows] == [
        {"image_file": f"{i}.png", "label": f"class-{i % 2}"} for i in range(3)
    ]
    report = validate_dataset(tmp_path / "out")  # the shard schema check knows the extras
    assert report.success, report.summary()
