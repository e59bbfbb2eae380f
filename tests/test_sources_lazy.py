"""Lazy image reads (sources hand out loaders, ingest workers read the files themselves)
and the WebDataset stream reader's direct member reads."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import pytest
from PIL import Image

from clip_data.checks import CheckConfig, Rejection, check_record
from clip_data.errors import SourceError
from clip_data.ingest import IngestConfig, ingest
from clip_data.records import RawRecord
from clip_data.sources import open_source


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12 + i, 12), (i * 30 % 256, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, n: int = 6) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"{i:02d}.png").write_bytes(_png(i))
        (root / f"{i:02d}.txt").write_text(f"picture {i}")
    (root / "no-caption.png").write_bytes(_png(50))
    (root / "no-image.txt").write_text("orphan caption")
    lines = ["filepath,caption"] + [f"{i:02d}.png,row {i}" for i in range(n)] + ["gone.png,x"]
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root


def _strip(record: RawRecord) -> RawRecord:
    return dataclasses.replace(record, image_loader=None, caption_loader=None)


@pytest.mark.parametrize("name", ["", "data.csv"])
def test_lazy_records_load_to_the_eager_ones(tmp_path: Path, name: str) -> None:
    uri = str(_folder(tmp_path / "src") / name) if name else str(_folder(tmp_path / "src"))
    eager = list(open_source(uri))
    lazy = list(open_source(uri, lazy_images=True))
    assert len(lazy) == len(eager) > 5
    with_loader = [r for r in lazy if r.image_loader is not None]
    assert len(with_loader) == len(eager) - (1 if not name else 0)  # the orphan caption has none
    assert all(r.image is None for r in with_loader)
    # the loaders survive pickling (they travel to worker processes) and read the same bytes
    shipped = pickle.loads(pickle.dumps(lazy))
    assert [_strip(r.loaded()) for r in shipped] == eager
    assert all(r.loaded() is r for r in eager)


def test_a_read_error_in_a_loader_is_a_short_source_error(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", n=2)
    (src / "00.png").unlink()
    (src / "00.png").mkdir()  # a directory where an image file should be
    record = next(r for r in open_source(str(src / "data.csv"), lazy_images=True))
    assert record.key == "00"
    with pytest.raises(SourceError, match=r"cannot read source .*00\.png") as caught:
        check_record(record, CheckConfig())
    assert "\n" not in str(caught.value)
    missing = list(open_source(str(src / "data.csv"), lazy_images=True))[1]
    (src / "01.png").unlink()
    result = check_record(missing, CheckConfig())
    assert isinstance(result, Rejection) and result.reason == "missing_image"


def test_ingest_reads_in_workers_with_identical_output(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", n=12)
    outputs = {}
    for workers in (1, 2):
        dest = tmp_path / f"out-{workers}"
        config = IngestConfig(workers=workers, chunk_size=3, max_bad_fraction=1.0)
        manifest = ingest(str(src), dest, config, progress=False)
        assert manifest["counts"]["accepted"] == 12
        assert manifest["counts"]["per_reason"] == {"missing_caption": 1, "missing_image": 1}
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(dest.iterdir())}
    assert outputs[1] == outputs[2]


def test_ingest_worker_read_error_leaves_nothing(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", n=8)
    (src / "05.png").unlink()
    (src / "05.png").mkdir()
    dest = tmp_path / "out"
    with pytest.raises(SourceError, match=r"05\.png"):
        ingest(str(src / "data.csv"), dest, IngestConfig(workers=2, chunk_size=2), progress=False)
    assert not dest.exists()


def test_tar_members_read_in_one_call_and_truncation_is_an_error(tmp_path: Path) -> None:
    """Member bytes are read straight from the stream; a tar cut inside a member fails."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a.png", _png(1)), ("a.txt", b"cap a"), ("b.png", _png(2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    (tmp_path / "ok.tar").write_bytes(whole)
    records = list(open_source(str(tmp_path / "ok.tar")))
    assert [(r.key, r.image, r.caption) for r in records] == [
        ("a", _png(1), b"cap a"),
        ("b", _png(2), None),
    ]
    cut = whole.index(_png(2)) + 10  # inside b.png's data
    (tmp_path / "cut.tar").write_bytes(whole[:cut])
    with pytest.raises(SourceError, match="cannot read source"):
        list(open_source(str(tmp_path / "cut.tar")))
