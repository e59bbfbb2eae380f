"""Evaluation-dataset registry: built-ins and user datasets (ImageFolder, CSV, Parquet)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_eval.datasets import (
    BUILTINS,
    DatasetError,
    MissingDatasetError,
    load_dataset,
    split_for_probe,
)


def _png(colour: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_synthetic_test_and_shifted() -> None:
    ds = load_dataset("synthetic-test", n_train=12, n_test=10, attribute="colour")
    assert len(ds.test) == 10 and ds.train is not None and len(ds.train) == 12
    assert ds.classnames[0] == "red" and all("{}" in t for t in ds.templates)
    assert all(0 <= y < len(ds.classnames) for y in ds.test.labels)
    assert ds.test.captions is not None and len(ds.test.captions) == 10
    shifted = load_dataset("synthetic-shifted", n_train=4, n_test=10, style="noisy")
    assert shifted.reference is not None
    assert shifted.reference.labels == shifted.test.labels  # same objects, other rendering
    assert (
        shifted.fingerprint != load_dataset("synthetic-shifted", n_train=4, n_test=10).fingerprint
    )
    held = load_dataset("synthetic-test", n_train=1, n_test=60, held_out_only=True)
    assert 0 < len(held.test) < 60
    with pytest.raises(DatasetError, match="style"):
        load_dataset("synthetic-test", style="sketch")


def test_sklearn_digits_rgb() -> None:
    ds = load_dataset("sklearn-digits", limit=60, image_size=24)
    assert ds.classnames == tuple(str(d) for d in range(10))
    assert ds.train is not None and len(ds.train) + len(ds.test) == 60
    image = ds.test.images[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (24, 24)


def test_fashion_mnist_subset() -> None:
    ds = load_dataset("fashion-mnist-test", n_train=15, n_test=12)
    assert len(ds.test) == 12 and ds.train is not None and len(ds.train) == 15
    assert len(ds.classnames) == 10 and "ankle boot" in ds.classnames
    assert all(0 <= y < 10 for y in ds.test.labels)
    assert isinstance(ds.test.images[0], bytes)


def test_tuxpaint_real_stamps_and_missing_package(tmp_path: Path) -> None:
    # ./dev test installs tuxpaint-stamps-default (see `system_packages` in ./dev)
    assert "tuxpaint" in BUILTINS
    with pytest.raises(MissingDatasetError, match="tuxpaint-stamps-default"):
        load_dataset("tuxpaint", root=str(tmp_path / "none"))
    ds = load_dataset("tuxpaint", limit=30)
    assert len(ds.test) == 30 and ds.test.captions is not None
    assert all(c and c[0].strip() for c in ds.test.captions)
    assert len(set(ds.test.labels)) >= 1 and all(
        0 <= y < len(ds.classnames) for y in ds.test.labels
    )
    everything = load_dataset("tuxpaint")
    assert len(everything.test) > 300 and len(everything.classnames) >= 5


def test_missing_fashion_package_names_apt(tmp_path: Path) -> None:
    with pytest.raises(MissingDatasetError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist-test", root=str(tmp_path))


def test_image_folder_with_classnames_and_templates(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(_png(colour))
    (root / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}, a type of pet.\n")
    ds = load_dataset(
        str(root),
        classnames=str(tmp_path / "names.txt"),
        templates=str(tmp_path / "templates.txt"),
    )
    assert ds.classnames == ("cat", "dog") and ds.templates == ("a photo of a {}, a type of pet.",)
    assert ds.test.labels == [0, 0, 0, 1, 1, 1] and ds.train is None
    train, test = split_for_probe(ds)
    assert len(train) + len(test) == 6 and set(test.labels) == {0, 1}
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(DatasetError, match="without"):
        load_dataset(str(root), templates=str(tmp_path / "bad.txt"))


def test_image_folder_train_test_layout_via_file_uri(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / "x.png").write_bytes(_png((9, 9, 9)))
    ds = load_dataset(f"file://{tmp_path}")
    assert ds.train is not None and len(ds.train) == 2 and len(ds.test) == 2
    assert ds.classnames == ("a", "b")


def test_csv_with_paths_and_captions(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = ["filepath,label,caption"]
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png((i * 50, 0, 0)))
        rows.append(f"img/{i}.png,{'red' if i % 2 else 'blue'},a {i}|another {i}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(str(tmp_path / "data.csv"), image_column="filepath")
    assert ds.classnames == ("blue", "red") and ds.test.labels == [0, 1, 0, 1]
    assert ds.test.captions is not None and ds.test.captions[1] == ["a 1", "another 1"]
    with pytest.raises(DatasetError, match="missing column"):
        load_dataset(str(tmp_path / "data.csv"))  # no "image" column
    with pytest.raises(DatasetError, match="unknown option"):
        load_dataset(str(tmp_path / "data.csv"), colour="x")


def test_parquet_with_bytes_and_split(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image": [_png((i * 30, 0, 0)) for i in range(6)],
            "label": [0, 1, 2, 0, 1, 2],
            "split": ["train"] * 3 + ["test"] * 3,
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    ds = load_dataset(str(tmp_path / "d.parquet"))
    assert ds.classnames == ("0", "1", "2")
    assert ds.train is not None and ds.train.labels == [0, 1, 2] and ds.test.labels == [0, 1, 2]


def test_unknown_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset(str(tmp_path / "nothing.txt"))


def test_image_folder_and_parquet_from_s3(moto_s3: tuple[str, Any], tmp_path: Path) -> None:
    endpoint, client = moto_s3
    client.create_bucket(Bucket="evalsets")
    for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        for i in range(2):
            client.put_object(Bucket="evalsets", Key=f"pets/{cls}/{i}.png", Body=_png(colour))
    client.put_object(Bucket="evalsets", Key="names.txt", Body=b"tabby cat\ndog\n")
    table = pa.table({"image": [_png((i * 40, 0, 0)) for i in range(4)], "label": [0, 1, 1, 0]})
    pq.write_table(table, tmp_path / "t.parquet")
    client.put_object(
        Bucket="evalsets", Key="t.parquet", Body=(tmp_path / "t.parquet").read_bytes()
    )
    options = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    ds = load_dataset(
        "s3://evalsets/pets", classnames="s3://evalsets/names.txt", storage_options=options
    )
    assert ds.classnames == ("tabby cat", "dog") and ds.test.labels == [0, 0, 1, 1]
    assert ds.test.images[2] == _png((0, 200, 0))
    ds = load_dataset("s3://evalsets/t.parquet", storage_options=options)
    assert ds.test.labels == [0, 1, 1, 0] and ds.classnames == ("0", "1")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset("s3://evalsets/missing.parquet", storage_options=options)
    client.put_object(Bucket="evalsets", Key="three.txt", Body=b"a\nb\nc\n")
    with pytest.raises(DatasetError, match="3 names for 2 classes"):
        load_dataset(
            "s3://evalsets/pets", classnames="s3://evalsets/three.txt", storage_options=options
        )
