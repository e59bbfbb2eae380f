"""Every source kind through the whole ingest: accepted + duplicates + quarantined == read."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_data.ingest import IngestConfig, ingest
from clip_data.sources import open_source

GOOD, BAD = 4, 3  # per source: good pairs, bad entries (corrupt image, bad caption, orphan)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16 + i, 16), (40 * i % 256, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _pairs() -> list[tuple[str, bytes, bytes]]:
    good = [(f"g{i}", _png(i), f"a picture number {i}".encode()) for i in range(GOOD)]
    bad = [("corrupt", b"\x89PNG not really", b"corrupt"), ("latin1", _png(9), b"caf\xe9")]
    return good + bad


def _folder(root: Path) -> str:
    for key, image, caption in _pairs():
        (root / f"{key}.png").write_bytes(image)
        (root / f"{key}.txt").write_bytes(caption)
    (root / "orphan.txt").write_bytes(b"caption without an image")
    return str(root)


def _table(root: Path, suffix: str) -> str:
    lines = []
    for key, image, caption in _pairs():
        (root / f"{key}.png").write_bytes(image)
        lines.append((f"{key}.png", caption))
    lines.append(("missing.png", b"no such image"))
    if suffix == ".csv":
        body = b"filepath,caption\n" + b"".join(p.encode() + b"," + c + b"\n" for p, c in lines)
    else:
        body = b"".join(
            json.dumps({"filepath": p, "caption": c.decode("latin-1")}).encode() + b"\n"
            if c != b"caf\xe9"
            else b'{"filepath": "' + p.encode() + b'", "caption": "caf\xe9"}\n'
            for p, c in lines
        )
    path = root / f"captions{suffix}"
    path.write_bytes(body)
    return str(path)


def _webdataset(root: Path) -> str:
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, image, caption in _pairs():
            for name, data in ((f"{key}.png", image), (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("../escape.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    return str(root / "00000.tar")


def _parquet(root: Path) -> str:
    pairs = _pairs()
    table = pa.table(
        {
            "image": [image for _, image, _ in pairs] + [None],
            # Parquet strings are UTF-8 by definition: the bad caption becomes an empty one
            "caption": [c.decode() if c != b"caf\xe9" else " " for _, _, c in pairs] + ["no image"],
        }
    )
    pq.write_table(table, root / "data.parquet")
    return str(root / "data.parquet")


def _tuxpaint(root: Path) -> str:
    animals = root / "animals"
    animals.mkdir()
    for key, image, caption in _pairs():
        (animals / f"{key}.png").write_bytes(image)
        (animals / f"{key}.txt").write_bytes(caption + b"\nsecond line is ignored")
    return "tuxpaint"


SOURCES: dict[str, Callable[[Path], str]] = {
    "folder": _folder,
    "csv": lambda root: _table(root, ".csv"),
    "jsonl": lambda root: _table(root, ".jsonl"),
    "webdataset": _webdataset,
    "parquet": _parquet,
    "synthetic": lambda root: "synthetic:train=12,test=4,plant=1",
    "fashion-mnist": lambda root: "fashion-mnist",
    "tuxpaint": _tuxpaint,
}
OPTIONS: dict[str, dict[str, Any]] = {"fashion-mnist": {"limit": 6}}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_row_is_accounted_for(tmp_path: Path, kind: str) -> None:
    (tmp_path / "src").mkdir()
    uri = SOURCES[kind](tmp_path / "src")
    options = OPTIONS.get(kind, {"root": str(tmp_path / "src")} if kind == "tuxpaint" else {})
    expected_read = sum(1 for _ in open_source(uri, kind, **options))
    config = IngestConfig(workers=1, max_bad_fraction=1.0)
    manifest = ingest(uri, tmp_path / "out", config, kind, progress=False, **options)
    counts = manifest["counts"]
    assert counts["read"] == expected_read > 0
    assert counts["accepted"] + counts["duplicates"] + counts["quarantined"] == counts["read"]
    if kind not in ("synthetic", "fashion-mnist"):
        assert counts["accepted"] == GOOD
        assert counts["quarantined"] == expected_read - GOOD >= BAD - 1
