"""Built-in demo corpora: the synthetic generator, Fashion-MNIST and the Tux Paint stamps.

Fashion-MNIST and Tux Paint come from Debian packages (``dataset-fashion-mnist``,
``tuxpaint-stamps-default``); a missing package raises ``MissingDatasetError`` naming the
``apt-get install`` command.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from clip_data.errors import MissingDatasetError, SourceError
from clip_data.records import RawRecord

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    *("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"),
    *("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)
TUXPAINT_ROOT = "/usr/share/tuxpaint/stamps"
_FASHION_TEMPLATES: tuple[str, ...] = (  # "{}" is the class name with its article
    *("a photo of {}.", "a grey picture of {}.", "{}", "a small black and white image of {}."),
    *("a product photo of {}", "this is {}.", "a low resolution photo of {}."),
    *("an item of clothing: {}", "a centred picture of {} on a black background."),
    *("a catalogue image showing {}.",),
)


def _parse_name_options(uri: str, name: str) -> dict[str, str]:
    """``"name:a=1,b=2"`` -> ``{"a": "1", "b": "2"}`` (``"name"`` alone -> ``{}``)."""
    _, _, spec = uri.partition(":")
    if uri.split(":", 1)[0] != name:
        raise SourceError(f"expected a {name!r} source name, got {uri!r}")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SourceError(f"bad option {item!r} in {uri!r}; expected name=value")
        options[key.strip()] = value.strip()
    return options


def read_synthetic(
    uri: str = "synthetic",
    *,
    train: int = 1000,
    test: int = 200,
    seed: int = 0,
    image_size: int = 64,
    style: str = "default",
    held_out_fraction: float = 0.2,
    plant: Iterable[int] = (),
) -> Iterator[RawRecord]:
    """The procedural corpus of :mod:`clip_core.synthetic`: ``train`` then ``test`` samples.

    Options may also be given in the name: ``"synthetic:train=100,test=20,seed=3,plant=1;4"``.
    ``plant`` lists test indices whose near-duplicates are appended to train, keyed
    ``<test key>-dup`` with ``extra["planted_from"]`` naming the test key. ``extra`` of every
    record holds the ground-truth attributes.
    """
    from clip_core.synthetic import SyntheticConfig, encode_png, generate, near_duplicate

    named = _parse_name_options(uri, "synthetic")
    try:
        train = int(named.get("train", train))
        test = int(named.get("test", test))
        config = SyntheticConfig(
            image_size=int(named.get("image_size", image_size)),
            seed=int(named.get("seed", seed)),
            held_out_fraction=float(named.get("held_out_fraction", held_out_fraction)),
            style=named.get("style", style),
        )
        planted = [int(i) for i in (named["plant"].split(";") if "plant" in named else plant)]
        if any(not 0 <= i < test for i in planted):
            raise ValueError(f"plant indices must be test indices in [0, {test}), got {planted}")
        samples = [generate(train, "train", config), generate(test, "test", config)]
    except ValueError as error:
        raise SourceError(f"bad synthetic options: {error}") from None
    for sample in (s for stream in samples for s in stream):
        extra = dataclasses.asdict(sample.attributes)
        image = encode_png(sample.image)
        yield RawRecord(sample.key, image, sample.caption.encode(), uri, sample.split, extra)
    for index in planted:
        original = next(generate(1, "test", config, start=index))
        duplicate = near_duplicate(original.image, seed=config.seed * 1_000_003 + index)
        extra = {**dataclasses.asdict(original.attributes), "planted_from": original.key}
        caption = original.caption.encode()
        yield RawRecord(f"{original.key}-dup", encode_png(duplicate), caption, uri, "train", extra)


def _idx_header(stream: gzip.GzipFile, magic: int, dims: int, path: Path) -> tuple[int, ...]:
    header = stream.read(4 + 4 * dims)
    if len(header) != 4 + 4 * dims or struct.unpack(">I", header[:4])[0] != magic:
        raise SourceError(f"{path}: not an IDX file with magic {magic:#x}")
    return struct.unpack(f">{dims}I", header[4:])


def fashion_mnist_sizes(root: str = FASHION_MNIST_ROOT) -> dict[str, int]:
    """Number of images per split (``{"train": 60000, "test": 10000}``), from the headers."""
    sizes: dict[str, int] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        path = _fashion_path(root, prefix, "images-idx3")
        with gzip.open(path, "rb") as stream:
            sizes[split] = _idx_header(stream, 0x803, 3, path)[0]
    return sizes


def _fashion_path(root: str, prefix: str, part: str) -> Path:
    path = Path(root) / f"{prefix}-{part}-ubyte.gz"
    if not path.is_file():
        raise MissingDatasetError(
            f"Fashion-MNIST not found ({path} is missing); install it with "
            "`apt-get install dataset-fashion-mnist`"
        )
    return path


def fashion_caption(index: int, label: int) -> str:
    """Deterministic caption of Fashion-MNIST image ``index`` with class ``label``."""
    name = FASHION_MNIST_CLASSES[label].lower()
    name = f"an {name}" if name[0] in "aeiou" else f"a {name}"
    return _FASHION_TEMPLATES[(index * 7 + label) % len(_FASHION_TEMPLATES)].format(name)


def read_fashion_mnist(
    uri: str = "fashion-mnist",
    *,
    root: str = FASHION_MNIST_ROOT,
    splits: Sequence[str] = ("train", "test"),
    limit: int | None = None,
) -> Iterator[RawRecord]:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: 28x28 grey PNGs.

    Captions come from varied templates of the class name, deterministic by index;
    ``extra = {"label": int, "class": name}``. ``limit`` caps the images read per split.
    Raises :class:`MissingDatasetError` when the package is not installed.
    """
    from PIL import Image

    from clip_core.synthetic import encode_png

    unknown = [s for s in splits if s not in ("train", "test")]
    if unknown:
        raise SourceError(f"unknown fashion-mnist split(s) {unknown}; use train and/or test")
    prefixes = {"train": "train", "test": "t10k"}
    paths = {
        s: [_fashion_path(root, prefixes[s], p) for p in ("images-idx3", "labels-idx1")]
        for s in splits
    }  # every file is checked before the first record
    for split in splits:
        image_path, label_path = paths[split]
        with gzip.open(label_path, "rb") as labels_file:
            (count,) = _idx_header(labels_file, 0x801, 1, label_path)
            labels = labels_file.read(count)
        with gzip.open(image_path, "rb") as images:
            n, rows, cols = _idx_header(images, 0x803, 3, image_path)
            for index in range(min(n, count) if limit is None else min(n, count, limit)):
                pixels = images.read(rows * cols)
                image = encode_png(Image.frombytes("L", (cols, rows), pixels))
                label = labels[index]
                caption = fashion_caption(index, label).encode()
                extra = {"label": label, "class": FASHION_MNIST_CLASSES[label]}
                key = f"fashion-mnist/{split}/{index:05d}"
                yield RawRecord(key, image, caption, uri, split, extra)


def read_tuxpaint(
    uri: str = "tuxpaint",
    *,
    root: str = TUXPAINT_ROOT,
    flatten: bool = True,
    limit: int | None = None,
    split: str = "train",
) -> Iterator[RawRecord]:
    """Tux Paint stamps from the Debian package ``tuxpaint-stamps-default``.

    Every ``**/*.png`` except under ``symbols/`` and ``*/cartoon/``; the caption is the first
    line of the ``.txt`` beside it (``None`` when absent); ``extra = {"category": top folder}``.
    With ``flatten`` the RGBA cut-out is pasted onto white and re-encoded as RGB PNG.
    Raises :class:`MissingDatasetError` when the package is not installed.
    """
    base = Path(root)
    if not base.is_dir():
        raise MissingDatasetError(
            f"Tux Paint stamps not found ({base} is missing); install them with "
            "`apt-get install tuxpaint-stamps-default`"
        )
    count = 0
    for path in sorted(base.rglob("*.png")):
        parts = path.relative_to(base).parts
        if len(parts) < 2 or parts[0] == "symbols" or "cartoon" in parts[1:-1]:
            continue
        if limit is not None and count >= limit:
            return
        text = path.with_suffix(".txt")
        lines = text.read_bytes().splitlines() if text.is_file() else []
        image = _flatten_on_white(path.read_bytes()) if flatten else path.read_bytes()
        key = path.relative_to(base).with_suffix("").as_posix()
        caption = lines[0].strip() if lines else None
        yield RawRecord(key, image, caption, uri, split, {"category": parts[0]})
        count += 1


def _flatten_on_white(data: bytes) -> bytes:
    """Paste an image with alpha onto white; undecodable bytes are returned unchanged."""
    from PIL import Image, UnidentifiedImageError

    from clip_core.synthetic import encode_png

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgba = image.convert("RGBA")
    except (UnidentifiedImageError, OSError):
        return data  # validation downstream reports it
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return encode_png(canvas)
