"""Tests of clip_data.sources: every source kind, unsafe tars, S3 through moto."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import socket
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_data.corpora import (
    FASHION_MNIST_CLASSES,
    FASHION_NAMES,
    fashion_caption,
    fashion_mnist_sizes,
)
from clip_data.errors import MissingDatasetError, SourceError
from clip_data.records import RawRecord
from clip_data.sources import SOURCE_KINDS, detect_kind, open_source, read_tar_stream


def png(colour: tuple[int, int, int] = (255, 0, 0), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (4, 4), colour if mode == "RGB" else (*colour, 0)).save(buf, format="PNG")
    return buf.getvalue()


def by_key(records: list[RawRecord]) -> dict[str, RawRecord]:
    return {r.key: r for r in records}


def add_member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
        tar.addfile(info)
        return
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(samples: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in samples:
            add_member(tar, name, data)
    return buf.getvalue()


class NonSeekable(io.RawIOBase):
    """A forward-only byte stream: any seek or tell fails."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("not seekable")

    def tell(self) -> int:
        raise io.UnsupportedOperation("not seekable")

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# --------------------------------------------------------------------------- folder


def test_folder_with_txt_captions_and_orphans(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "a.txt").write_bytes(b"a red square\n")
    (tmp_path / "sub" / "b.jpg").write_bytes(b"jpeg-bytes")
    (tmp_path / "sub" / "b.txt").write_bytes(b"caf\xe9 latin-1")  # not UTF-8: kept raw
    (tmp_path / "orphan.txt").write_bytes(b"no image")
    (tmp_path / "lonely.webp").write_bytes(b"webp-bytes")
    (tmp_path / "notes.md").write_bytes(b"ignored")
    assert detect_kind(str(tmp_path)) == "folder"
    records = list(open_source(str(tmp_path)))
    assert [r.key for r in records] == ["a", "lonely", "orphan", "sub/b"]
    got = by_key(records)
    assert got["a"].image == png() and got["a"].caption == b"a red square\n"
    assert got["sub/b"].image == b"jpeg-bytes" and got["sub/b"].caption == b"caf\xe9 latin-1"
    assert got["orphan"].image is None and got["orphan"].caption == b"no image"
    assert got["lonely"].image == b"webp-bytes" and got["lonely"].caption is None
    assert all(r.source == str(tmp_path) and r.problem is None for r in records)


# --------------------------------------------------------------------------- csv / tsv / jsonl


def write_images(folder: Path) -> None:
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "x.png").write_bytes(png((1, 2, 3)))
    (folder / "img" / "y.png").write_bytes(png((4, 5, 6)))


def test_csv_relative_paths_raw_captions_and_duplicates(tmp_path: Path) -> None:
    write_images(tmp_path)
    rows = b'filepath,caption,licence\nimg/x.png,"one, two",cc\nimg/y.png,caf\xe9,\n'
    rows += b"img/x.png,second caption,cc\nimg/missing.png,gone,\nimg/y.png,,\n"
    (tmp_path / "caps.csv").write_bytes(rows)
    records = list(open_source(str(tmp_path / "caps.csv")))
    assert [r.key for r in records] == ["img/x", "img/y", "img/x#1", "img/missing", "img/y#1"]
    assert records[0].caption == b"one, two" and records[0].image == png((1, 2, 3))
    assert records[0].extra == {"licence": "cc", "image_file": "img/x.png"}
    assert records[1].caption == b"caf\xe9"  # invalid UTF-8 survives byte for byte
    assert records[2].caption == b"second caption"
    assert records[3].image is None and records[3].caption == b"gone"
    assert records[4].caption is None and records[4].image == png((4, 5, 6))


def test_csv_missing_columns_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("path,text\na.png,hello\n")
    with pytest.raises(SourceError, match=r"missing column\(s\) \['filepath', 'caption'\]"):
        list(open_source(str(tmp_path / "bad.csv")))
    records = list(
        open_source(str(tmp_path / "bad.csv"), image_column="path", caption_column="text")
    )
    assert [(r.key, r.caption, r.image) for r in records] == [("a", b"hello", None)]


def test_tsv_and_excel_bom(tmp_path: Path) -> None:
    write_images(tmp_path)
    (tmp_path / "caps.tsv").write_bytes(b"\xef\xbb\xbfcaption\tfilepath\na, b\timg/y.png\n")
    assert detect_kind(str(tmp_path / "caps.tsv")) == "csv"
    records = list(open_source(str(tmp_path / "caps.tsv")))
    assert [(r.key, r.caption, r.image) for r in records] == [("img/y", b"a, b", png((4, 5, 6)))]


def test_jsonl(tmp_path: Path) -> None:
    write_images(tmp_path)
    lines = [
        json.dumps({"filepath": "img/x.png", "caption": "caf\u00e9", "score": 0.5}),
        "{not json",
        "",
        json.dumps({"caption": "no path"}),
        json.dumps({"filepath": "img/y.png"}),
    ]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    records = list(open_source(str(tmp_path / "caps.jsonl")))
    assert [r.key for r in records] == ["img/x", "line-2", "line-4", "img/y"]
    assert records[0].caption == "café".encode() and records[0].extra["score"] == 0.5
    assert records[0].image == png((1, 2, 3))
    assert records[1].problem == "line 2 is not a JSON object"
    assert records[2].problem == "no image path" and records[2].caption == b"no path"
    assert records[3].caption is None and records[3].problem is None


# --------------------------------------------------------------------------- webdataset


def test_webdataset_tar_with_metadata_and_unsafe_members(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    evil_rel, evil_abs = f"../evil-{token}.txt", f"/tmp/evil-{token}.txt"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "000000000.jpg", b"jpg0")
        add_member(tar, "000000000.txt", b"caption zero")
        add_member(tar, "000000000.json", json.dumps({"width": 4, "url": "u"}).encode())
        add_member(tar, evil_rel, b"pwned")
        add_member(tar, evil_abs, b"pwned")
        add_member(tar, "link.png", b"", tarfile.SYMTYPE)
        add_member(tar, "000000001.png", b"png1")
        add_member(tar, "000000001.txt", b"\xff\xfe raw")
        add_member(tar, "000000002.txt", b"orphan caption")
        add_member(tar, "000000003.webp", b"webp3")
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(buf.getvalue())
    before = sorted(p.name for p in tmp_path.rglob("*"))
    records = list(open_source(str(shard)))
    safe = [r.key for r in records if r.problem is None]
    assert safe == ["000000000", "000000001", "000000002", "000000003"]
    got = by_key(records)
    assert got["000000000"].image == b"jpg0" and got["000000000"].caption == b"caption zero"
    assert got["000000000"].extra["metadata"] == {"width": 4, "url": "u"}
    assert got["000000001"].caption == b"\xff\xfe raw" and got["000000001"].image == b"png1"
    assert got["000000002"].image is None and got["000000002"].caption == b"orphan caption"
    assert got["000000003"].image == b"webp3" and got["000000003"].caption is None
    unsafe = [r for r in records if r.problem]
    assert len(unsafe) == 3
    assert all(r.problem.startswith("unsafe tar member name: ") for r in unsafe if r.problem)
    assert all(r.image is None and r.caption is None for r in unsafe)
    assert {r.extra["member"] for r in unsafe} == {evil_rel, evil_abs, "link.png"}
    assert len({r.key for r in records}) == len(records)
    # nothing was extracted anywhere
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / evil_rel).exists() and not (shard.parent / evil_rel).exists()
    assert not Path(evil_abs).exists() and not (Path.cwd() / evil_rel).exists()


def test_tar_is_read_as_a_forward_only_stream() -> None:
    data = gzip.compress(
        make_tar(
            [("a/k1.png", b"p1"), ("a/k1.txt", b"t1"), ("a/k2.jpg", b"p2"), ("./a/k3.png", b"p3")]
        )
    )
    stream = NonSeekable(data)
    with pytest.raises(io.UnsupportedOperation):
        stream.seek(0)
    records = list(read_tar_stream(stream, "mem"))  # type: ignore[arg-type]
    assert [(r.key, r.image, r.caption) for r in records] == [
        ("a/k1", b"p1", b"t1"),
        ("a/k2", b"p2", None),
        ("a/k3", b"p3", None),
    ]


def test_folder_and_glob_of_shards_keep_keys_unique(tmp_path: Path) -> None:
    (tmp_path / "b.tar").write_bytes(make_tar([("k.png", b"second"), ("k.txt", b"2")]))
    (tmp_path / "a.tar").write_bytes(make_tar([("k.png", b"first"), ("k.txt", b"1")]))
    assert detect_kind(str(tmp_path)) == "webdataset"
    records = list(open_source(str(tmp_path)))
    assert [(r.key, r.image) for r in records] == [("k", b"first"), ("b.tar/k", b"second")]
    globbed = list(open_source(str(tmp_path / "*.tar")))
    assert [r.key for r in globbed] == ["k", "b.tar/k"]
    (tmp_path / "c.tar").write_bytes(make_tar([("k.png", b"3"), ("j.png", b"4"), ("k.txt", b"5")]))
    keys = [r.key for r in open_source(str(tmp_path))]
    assert keys == ["k", "b.tar/k", "c.tar/k", "j", "c.tar/k#1"]


# --------------------------------------------------------------------------- parquet


def test_parquet_with_bytes_and_with_paths(tmp_path: Path) -> None:
    write_images(tmp_path)
    table = pa.table({"key": ["k1", "k2"], "jpg": [b"i1", None], "text": ["one", "two"]})
    pq.write_table(table, tmp_path / "bytes.parquet")
    records = list(
        open_source(str(tmp_path / "bytes.parquet"), image_column="jpg", caption_column="text")
    )
    assert [(r.key, r.image, r.caption) for r in records] == [
        ("k1", b"i1", b"one"),
        ("k2", None, b"two"),
    ]
    paths = pa.table({"image_path": ["img/x.png", "img/nope.png"], "caption": [b"\xff", None]})
    (tmp_path / "dir").mkdir()
    pq.write_table(paths, tmp_path / "dir" / "part-0.parquet")
    (tmp_path / "dir" / "img").symlink_to(tmp_path / "img")
    assert detect_kind(str(tmp_path / "dir")) == "parquet"
    records = list(open_source(str(tmp_path / "dir"), batch_size=1))
    assert [r.key for r in records] == ["part-0/00000000", "part-0/00000001"]
    assert records[0].image == png((1, 2, 3)) and records[0].caption == b"\xff"
    assert records[1].image is None and records[1].caption is None
    with pytest.raises(SourceError, match="caption"):
        list(open_source(str(tmp_path / "bytes.parquet")))
    with pytest.raises(SourceError, match="image or image_path"):
        list(open_source(str(tmp_path / "bytes.parquet"), caption_column="text"))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_plants_near_duplicates() -> None:
    first = list(open_source("synthetic:train=4,test=3,seed=5,plant=2;0", image_size=32))
    again = list(open_source("synthetic", train=4, test=3, seed=5, image_size=32, plant=[2, 0]))
    assert [dataclasses.replace(r, source="") for r in first] == [
        dataclasses.replace(r, source="") for r in again
    ]
    assert first[0].source == "synthetic:train=4,test=3,seed=5,plant=2;0"
    assert [r.split for r in first] == ["train"] * 4 + ["test"] * 3 + ["train"] * 2
    assert first[0].key == "synth-train-00000000" and first[4].key == "synth-test-00000000"
    assert {"shape", "colour", "count"} <= set(first[0].extra)
    originals = {r.key: r for r in first if r.split == "test"}
    planted = first[-2:]
    assert [r.extra["planted_from"] for r in planted] == [
        "synth-test-00000002",
        "synth-test-00000000",
    ]
    for dup in planted:
        source = originals[dup.extra["planted_from"]]
        assert dup.caption == source.caption and dup.image != source.image
        assert dup.image is not None and source.image is not None
        a = np.asarray(Image.open(io.BytesIO(dup.image)).convert("L").resize((16, 16)), float)
        b = np.asarray(Image.open(io.BytesIO(source.image)).convert("L").resize((16, 16)), float)
        assert np.abs(a - b).mean() < 30
    other_seed = list(open_source("synthetic:train=1,test=0,seed=6", image_size=32))
    assert other_seed[0].image != first[0].image
    with pytest.raises(SourceError, match="synthetic"):
        list(open_source("synthetic:train=-1"))
    with pytest.raises(SourceError, match="plant indices"):
        list(open_source("synthetic:train=1,test=2,plant=2"))


# --------------------------------------------------------------------------- built-in packages


def test_fashion_mnist() -> None:
    assert fashion_mnist_sizes() == {"train": 60000, "test": 10000}
    records = list(open_source("fashion-mnist", limit=20))
    assert [r.split for r in records] == ["train"] * 20 + ["test"] * 20
    assert (
        records[0].key == "fashion-mnist/train/00000"
        and records[20].key == "fashion-mnist/test/00000"
    )
    for record in records:
        name = FASHION_MNIST_CLASSES[record.extra["label"]]
        assert record.extra["class"] == name and record.caption is not None
        label = record.extra["label"]
        assert record.caption == fashion_caption(int(record.key[-5:]), label).encode()
        assert any(n.encode() in record.caption for n in FASHION_NAMES[label])
    assert len({r.caption for r in records}) > 5  # varied templates
    assert records[0].image is not None
    image = Image.open(io.BytesIO(records[0].image))
    assert image.size == (28, 28) and image.mode == "L"
    assert records[0].extra["label"] == 9  # the first training image is an ankle boot
    assert list(open_source("fashion-mnist", limit=20)) == records
    tests_only = list(open_source("fashion-mnist", splits=["test"], limit=2))
    assert tests_only == records[20:22]


def test_missing_packages_name_the_apt_command(tmp_path: Path) -> None:
    with pytest.raises(MissingDatasetError, match="apt-get install dataset-fashion-mnist"):
        open_source("fashion-mnist", root=str(tmp_path / "none"))  # raised when opened
    with pytest.raises(MissingDatasetError, match="apt-get install tuxpaint-stamps-default"):
        open_source("tuxpaint", root=str(tmp_path / "none"))


def test_tuxpaint_fake_tree(tmp_path: Path) -> None:
    root = tmp_path / "stamps"
    for folder in ("animals/mammals", "animals/cartoon", "symbols", "town"):
        (root / folder).mkdir(parents=True)
    (root / "animals" / "mammals" / "koala.png").write_bytes(png((9, 9, 9), mode="RGBA"))
    (root / "animals" / "mammals" / "koala.txt").write_bytes(b"A koala.\nde=Ein Koala.\n")
    (root / "animals" / "cartoon" / "tux.png").write_bytes(png())
    (root / "symbols" / "arrow.png").write_bytes(png())
    (root / "town" / "mixer.png").write_bytes(png((0, 0, 255)))
    records = list(open_source("tuxpaint", root=str(root)))
    assert [r.key for r in records] == ["animals/mammals/koala", "town/mixer"]
    koala, mixer = records
    assert koala.caption == b"A koala." and koala.extra == {"category": "animals"}
    assert mixer.caption is None and mixer.extra == {"category": "town"}
    assert koala.image is not None
    flat = Image.open(io.BytesIO(koala.image))
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 255, 255)  # alpha 0 -> white
    raw = list(open_source("tuxpaint", root=str(root), flatten=False, limit=1))
    assert [r.image for r in raw] == [png((9, 9, 9), mode="RGBA")]


# --------------------------------------------------------------------------- dispatch errors


def test_dispatch_errors(tmp_path: Path) -> None:
    assert set(SOURCE_KINDS) == {
        *("folder", "csv", "jsonl", "webdataset"),
        *("parquet", "synthetic", "fashion-mnist", "tuxpaint", "demo-mix"),
    }
    with pytest.raises(SourceError, match="unknown source kind 'zip'"):
        open_source(str(tmp_path), kind="zip")
    with pytest.raises(SourceError, match="bad options for a folder source"):
        open_source(str(tmp_path), kind="folder", image_column="x")
    with pytest.raises(SourceError, match="no such source"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="cannot tell the kind"):
        open_source(str(tmp_path / "*.zip"))
    assert [detect_kind(n) for n in ("synthetic:train=1", "fashion-mnist", "tuxpaint")] == [
        "synthetic",
        "fashion-mnist",
        "tuxpaint",
    ]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(make_tar([("k.png", b"ok")]))
    (shards / "b.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(SourceError, match="cannot read source"):
        open_source(str(shards / "b.tar"))
    stream = open_source(str(shards))  # the first shard is fine; the error comes later
    assert next(stream).image == b"ok"
    with pytest.raises(SourceError, match=r"cannot read source .*shards"):
        next(stream)


# --------------------------------------------------------------------------- S3 through moto


@pytest.fixture(scope="module")
def s3_endpoint(moto_s3: tuple[str, Any]) -> Iterator[str]:
    endpoint, client = moto_s3
    client.create_bucket(Bucket="clipops-sources")
    client.put_object(Bucket="clipops-sources", Key="set/img/x.png", Body=png((1, 2, 3)))
    body = b"filepath,caption\nimg/x.png,from s3\nimg/absent.png,gone\n"
    client.put_object(Bucket="clipops-sources", Key="set/caps.csv", Body=body)
    shard = make_tar([("s0.jpg", b"j"), ("s0.txt", b"tar on s3"), ("../up.txt", b"x")])
    client.put_object(Bucket="clipops-sources", Key="wds/00000.tar", Body=shard)
    yield endpoint


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}


def test_s3_csv_and_tar(s3_endpoint: str) -> None:
    options = s3_options(s3_endpoint)
    records = list(open_source("s3://clipops-sources/set/caps.csv", storage_options=options))
    assert [(r.key, r.image, r.caption) for r in records] == [
        ("img/x", png((1, 2, 3)), b"from s3"),
        ("img/absent", None, b"gone"),
    ]
    shards = list(open_source("s3://clipops-sources/wds/", storage_options=options))
    assert [(r.key, r.caption) for r in shards if not r.problem] == [("s0", b"tar on s3")]
    assert [r.problem for r in shards if r.problem] == [
        "unsafe tar member name: '../up.txt' (parent-directory reference)"
    ]


def test_s3_missing_bucket_is_a_short_source_error(s3_endpoint: str) -> None:
    options = s3_options(s3_endpoint)
    with pytest.raises(SourceError) as caught:
        open_source("s3://no-such-bucket-here/caps.csv", storage_options=options)
    message = str(caught.value)
    assert "no-such-bucket-here" in message and "\n" not in message and len(message) < 400
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(SourceError, match="no such source"):
        open_source("s3://no-such-bucket-here/folder", storage_options=options)


def test_s3_unreachable_endpoint_is_a_source_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = s3_options(f"http://127.0.0.1:{port}")
    options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
    with pytest.raises(SourceError, match=r"cannot read source.*Could not connect"):
        list(open_source("s3://clipops-sources/set/caps.csv", storage_options=options))
    with pytest.raises(SourceError, match=r"cannot open source.*Could not connect"):
        open_source("s3://clipops-sources/set", storage_options=options)
