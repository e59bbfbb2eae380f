"""Evaluation datasets: built-ins by name and user datasets from any fsspec URI.

Built-ins (:data:`BUILTINS`):

* ``synthetic-test``: the procedural corpus' test split (held-out colour/shape compositions
  included; ``held_out_only=true`` keeps only those), probes train on its train split.
* ``synthetic-shifted``: the same test objects drawn in a shifted ``style`` (default
  ``sketch``); ``reference`` is the default-style test split (robustness).
* ``fashion-mnist-test``: Fashion-MNIST (Debian package ``dataset-fashion-mnist``).
* ``tuxpaint``: Tux Paint stamps with their captions (retrieval; Debian package
  ``tuxpaint-stamps-default``); labels are the stamp categories. ``part: test`` keeps the
  held-out stamps that the ``demo-mix`` corpus never trains on (``train``, ``all``).
* ``sklearn-digits``: scikit-learn's 8x8 digits, upscaled to RGB.

User datasets (anything else is a URI):

* an ImageFolder directory: ``root/<class>/<image>``, or ``root/train/<class>/...`` plus
  ``root/test/<class>/...``;
* a ``.csv`` or ``.parquet`` file with an image column (bytes, or a path relative to the
  file's folder) and a label column (class name or integer), optionally a ``split`` column
  (``train``/``test``) and a ``caption`` column (``|``-separated captions, for retrieval).

``classnames`` and ``templates`` options name text files (one entry a line) that override
the defaults. Class names either contain every label found, or give display names for the
sorted labels (e.g. WordNet-id folders), one per line in that order.
Without a train split, probes split the test data (see :func:`split_for_probe`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from clip_core.zeroshot import DATASET_TEMPLATES, IMAGENET_TEMPLATES
from clip_data.errors import MissingDatasetError, SourceError
from clip_data.files import open_fs

ImageLike = Image.Image | bytes

__all__ = [
    "BUILTINS",
    "DatasetError",
    "EvalDataset",
    "MissingDatasetError",
    "Split",
    "dataset_requirements",
    "load_dataset",
]


class DatasetError(SourceError):
    """An evaluation dataset cannot be loaded: unknown name, bad options, missing columns."""


@dataclass(frozen=True)
class Split:
    """Images with integer labels (``-1`` when unlabelled) and optional captions per image."""

    images: list[ImageLike]
    labels: list[int]
    captions: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class EvalDataset:
    """A dataset as the suite sees it.

    ``test`` is what metrics are reported on, ``train`` (optional) feeds probes,
    ``reference`` (optional) is the in-distribution counterpart of a shifted ``test``.
    ``fingerprint`` identifies name + options (a feature-cache key).
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    test: Split
    train: Split | None = None
    reference: Split | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Short hash of the name and options."""
        text = json.dumps({"name": self.name, **self.options}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _take(options: dict[str, Any], allowed: dict[str, Any], name: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DatasetError(
            f"dataset {name!r}: unknown option(s) {unknown}; allowed {sorted(allowed)}"
        )
    return {**allowed, **options}


# --------------------------------------------------------------------------- built-ins


def _synthetic_split(
    n: int, split: str, attribute: str, *, style: str, seed: int, size: int, held_out_only: bool
) -> Split:
    from clip_core.synthetic import SyntheticConfig, generate, held_out_compositions, label_of

    config = SyntheticConfig(image_size=size, seed=seed, style=style)
    held = held_out_compositions(config) if held_out_only else frozenset()
    images: list[ImageLike] = []
    labels: list[int] = []
    captions: list[list[str]] = []
    for sample in generate(n, split, config):
        a = sample.attributes
        if held_out_only and (a.colour, a.shape) not in held:
            continue
        images.append(sample.image)
        labels.append(label_of(sample, attribute))
        captions.append([sample.caption])
    return Split(images, labels, captions)


_SYNTH_OPTIONS = {
    "attribute": "shape",
    "n_train": 600,
    "n_test": 300,
    "seed": 0,
    "image_size": 64,
    "held_out_only": False,
    "style": "sketch",
}


def _synthetic(name: str, options: dict[str, Any]) -> EvalDataset:
    from clip_core.synthetic import class_prompts

    o = _take(options, _SYNTH_OPTIONS, name)
    attr = str(o["attribute"])
    common = {"seed": int(o["seed"]), "size": int(o["image_size"])}
    shifted = name == "synthetic-shifted"
    if not shifted and "style" in options:
        raise DatasetError("synthetic-test: 'style' is only an option of synthetic-shifted")
    held = bool(o["held_out_only"])
    test = _synthetic_split(
        int(o["n_test"]),
        "test",
        attr,
        style=str(o["style"]) if shifted else "default",
        held_out_only=held,
        **common,
    )
    train = _synthetic_split(
        int(o["n_train"]), "train", attr, style="default", held_out_only=False, **common
    )
    reference = None
    if shifted:
        reference = _synthetic_split(
            int(o["n_test"]), "test", attr, style="default", held_out_only=held, **common
        )
    key = "synthetic_colour" if attr == "color" else f"synthetic_{attr}"
    templates = DATASET_TEMPLATES.get(key, ("a {}.", "a picture of a {}."))
    return EvalDataset(
        name,
        tuple(class_prompts(attr)),
        templates,
        test,
        train,
        reference,
        o if shifted else {k: v for k, v in o.items() if k != "style"},
    )


def _fashion(name: str, options: dict[str, Any]) -> EvalDataset:
    from clip_data.corpora import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, read_fashion_mnist

    o = _take(options, {"n_train": 1000, "n_test": 500, "root": FASHION_MNIST_ROOT}, name)

    def split(which: str, limit: int) -> Split:
        records = read_fashion_mnist(splits=(which,), limit=limit, root=str(o["root"]))
        images: list[ImageLike] = []
        labels: list[int] = []
        for r in records:
            assert r.image is not None
            images.append(r.image)
            labels.append(int(r.extra["label"]))
        return Split(images, labels)

    classes = tuple(c.lower() for c in FASHION_MNIST_CLASSES)
    templates = DATASET_TEMPLATES["fashion_mnist"]
    test, train = split("test", int(o["n_test"])), split("train", int(o["n_train"]))
    return EvalDataset(name, classes, templates, test, train, options=o)


def _tuxpaint(name: str, options: dict[str, Any]) -> EvalDataset:
    from clip_data.corpora import TUXPAINT_ROOT, read_tuxpaint

    o = _take(options, {"limit": None, "root": TUXPAINT_ROOT, "part": "all"}, name)
    limit = None if o["limit"] is None else int(o["limit"])
    stamps = read_tuxpaint(root=str(o["root"]), limit=limit, part=str(o["part"]))
    records = [r for r in stamps if r.caption]
    categories = sorted({str(r.extra["category"]) for r in records})
    images: list[ImageLike] = [r.image for r in records if r.image is not None]
    labels = [categories.index(str(r.extra["category"])) for r in records]
    captions = [[(r.caption or b"").decode("utf-8", "replace")] for r in records]
    test = Split(images, labels, captions)
    return EvalDataset(name, tuple(categories), IMAGENET_TEMPLATES, test, options=o)


def _digit_image(pixels: Any, size: int) -> Image.Image:
    grey = Image.fromarray((pixels * 15).clip(0, 255).astype("uint8"), "L")
    return grey.resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def _digits(name: str, options: dict[str, Any]) -> EvalDataset:
    from sklearn.datasets import load_digits

    o = _take(options, {"image_size": 32, "limit": None, "test_every": 3}, name)
    data = load_digits()
    n = len(data.target) if o["limit"] is None else min(int(o["limit"]), len(data.target))
    every = int(o["test_every"])
    images = [_digit_image(data.images[i], int(o["image_size"])) for i in range(n)]
    labels = [int(t) for t in data.target[:n]]
    test_idx = [i for i in range(n) if i % every == 0]
    train_idx = [i for i in range(n) if i % every != 0]
    test = Split([images[i] for i in test_idx], [labels[i] for i in test_idx])
    train = Split([images[i] for i in train_idx], [labels[i] for i in train_idx])
    classes = tuple(str(d) for d in range(10))
    return EvalDataset(name, classes, DATASET_TEMPLATES["digits"], test, train, options=o)


BUILTINS: dict[str, Callable[[str, dict[str, Any]], EvalDataset]] = {
    "synthetic-test": _synthetic,
    "synthetic-shifted": _synthetic,
    "fashion-mnist-test": _fashion,
    "tuxpaint": _tuxpaint,
    "sklearn-digits": _digits,
}


# --------------------------------------------------------------------------- user datasets

_USER_OPTIONS: dict[str, Any] = {
    "classnames": None,
    "templates": None,
    "image_column": "image",
    "label_column": "label",
    "caption_column": "caption",
    "split_column": "split",
    "storage_options": None,
    "limit": None,
}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def _read_lines(uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    fs, path = open_fs(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise DatasetError(f"no such file: {uri!r}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _image_folder(
    fs: Any, root: str, limit: int | None
) -> dict[str, tuple[list[bytes], list[str]]]:
    """``{split: (image bytes, class names)}`` of an ImageFolder (one split: ``"test"``)."""
    subdirs = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    split_roots = (
        {s: f"{root}/{s}" for s in ("train", "test")}
        if {"train", "test"} <= set(subdirs) and fs.isdir(f"{root}/train")
        else {"test": root}
    )
    out: dict[str, tuple[list[bytes], list[str]]] = {}
    for split, base in split_roots.items():
        images: list[bytes] = []
        names: list[str] = []
        for path in sorted(str(p) for p in fs.find(base)):
            rel = path[len(base) :].lstrip("/")
            if "/" not in rel or not rel.lower().endswith(_IMAGE_SUFFIXES):
                continue
            if limit is not None and len(images) >= limit:
                break
            images.append(fs.cat_file(path))
            names.append(rel.split("/", 1)[0])
        out[split] = (images, names)
    return out


def _table_rows(fs: Any, path: str, columns: dict[str, str]) -> list[dict[str, Any]]:
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        rows: list[dict[str, Any]] = table.to_pylist()
        names = table.column_names
    else:
        with fs.open(path, "rb") as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            rows = list(reader)
            names = list(reader.fieldnames or [])
    missing = [columns[c] for c in ("image_column", "label_column") if columns[c] not in names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; found {names}")
    return rows


def _table(
    fs: Any, path: str, o: dict[str, Any]
) -> tuple[dict[str, tuple[list[bytes], list[str]]], dict[str, list[list[str]]]]:
    rows = _table_rows(fs, path, o)
    base = posixpath.dirname(path)
    splits: dict[str, tuple[list[bytes], list[str]]] = {}
    captions: dict[str, list[list[str]]] = {}
    for i, row in enumerate(rows):
        if o["limit"] is not None and i >= int(o["limit"]):
            break
        value = row[o["image_column"]]
        if isinstance(value, dict):  # Hugging Face Image feature
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            value = fs.cat_file(posixpath.join(base, value))
        if not isinstance(value, bytes | bytearray):
            raise DatasetError(f"{path}: row {i} has no image in {o['image_column']!r}")
        split = str(row.get(o["split_column"]) or "test")
        if split not in ("train", "test"):
            raise DatasetError(f"{path}: row {i} has split {split!r}; expected train or test")
        images, names = splits.setdefault(split, ([], []))
        images.append(bytes(value))
        names.append(str(row[o["label_column"]]))
        caption = row.get(o["caption_column"])
        if isinstance(caption, str) and caption:
            captions.setdefault(split, []).append(caption.split("|"))
    return splits, captions


def _user(uri: str, options: dict[str, Any]) -> EvalDataset:
    o = _take(options, _USER_OPTIONS, uri)
    storage = o["storage_options"]
    fs, root = open_fs(uri, storage)
    limit = None if o["limit"] is None else int(o["limit"])
    captions: dict[str, list[list[str]]] = {}
    if fs.isdir(root):
        splits = _image_folder(fs, root, limit)
    elif root.lower().endswith((".csv", ".parquet")):
        if not fs.exists(root):
            raise DatasetError(f"no such file: {uri!r}")
        splits, captions = _table(fs, root, o)
    else:
        raise DatasetError(
            f"unknown dataset {uri!r}: not a built-in ({sorted(BUILTINS)}), a folder, "
            "a .csv or a .parquet file"
        )
    if not splits.get("test") or not splits["test"][0]:
        raise DatasetError(f"dataset {uri!r} has no (test) images")
    found = sorted({n for _, names in splits.values() for n in names})
    if o["classnames"] is not None:
        classnames = tuple(_read_lines(str(o["classnames"]), storage))
    elif all(n.lstrip("-").isdigit() for n in found):
        classnames = tuple(str(i) for i in range(max(int(n) for n in found) + 1))
    else:
        classnames = tuple(found)

    by_order: dict[str, int] = {}
    if o["classnames"] is not None and not set(found) <= set(classnames):
        # display names for the sorted folder/label names (torchvision's ImageFolder order)
        if len(found) != len(classnames):
            raise DatasetError(
                f"dataset {uri!r}: classnames file {o['classnames']!r} has {len(classnames)} "
                f"names for {len(found)} classes {found[:5]}..."
            )
        by_order = {n: i for i, n in enumerate(found)}

    def label(name: str) -> int:
        if name in by_order:
            return by_order[name]
        if name in classnames:
            return classnames.index(name)
        if name.isdigit() and int(name) < len(classnames):
            return int(name)
        raise DatasetError(f"dataset {uri!r}: label {name!r} is not among the class names")

    templates = IMAGENET_TEMPLATES
    if o["templates"] is not None:
        templates = tuple(_read_lines(str(o["templates"]), storage))
        bad = [t for t in templates if "{}" not in t]
        if bad or not templates:
            raise DatasetError(f"templates file {o['templates']!r}: lines without '{{}}': {bad}")
    built = {
        s: Split(list(imgs), [label(n) for n in names], captions.get(s) or None)
        for s, (imgs, names) in splits.items()
    }
    return EvalDataset(uri, classnames, templates, built["test"], built.get("train"), options=o)


def dataset_requirements(spec: str, options: dict[str, Any]) -> list[Callable[[], None]]:
    """Checks of the system datasets the built-in ``spec`` reads, without loading them: each
    raises :class:`MissingDatasetError` naming the install command (empty for other specs)."""
    from clip_data.corpora import (
        FASHION_MNIST_ROOT,
        TUXPAINT_ROOT,
        check_fashion_mnist,
        check_tuxpaint,
    )

    if spec == "fashion-mnist-test":
        root = str(options.get("root", FASHION_MNIST_ROOT))
        return [lambda: check_fashion_mnist(root)]
    if spec == "tuxpaint":
        tux_root = str(options.get("root", TUXPAINT_ROOT))
        return [lambda: check_tuxpaint(tux_root)]
    return []


def load_dataset(spec: str, **options: Any) -> EvalDataset:
    """A built-in by name (see :data:`BUILTINS`) or a user dataset at a URI, with options.

    Raises :class:`DatasetError` (or :class:`MissingDatasetError`, naming the ``apt-get``
    package to install) when it cannot be loaded.
    """
    if spec in BUILTINS:
        return BUILTINS[spec](spec, dict(options))
    return _user(spec, dict(options))


def split_for_probe(dataset: EvalDataset, *, seed: int = 0) -> tuple[Split, Split]:
    """(train, test) for a probe: the dataset's own train split, else half of test per class."""
    if dataset.train is not None and len(dataset.train):
        return dataset.train, dataset.test
    from clip_core.probe import stratified_split

    tr, te = stratified_split(dataset.test.labels, fraction=0.5, seed=seed)
    return _subset(dataset.test, [int(i) for i in tr]), _subset(dataset.test, [int(i) for i in te])


def _subset(split: Split, index: Sequence[int]) -> Split:
    caps = None if split.captions is None else [split.captions[i] for i in index]
    return Split([split.images[i] for i in index], [split.labels[i] for i in index], caps)
