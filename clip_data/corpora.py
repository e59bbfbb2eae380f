"""Built-in demo corpora: the synthetic generator, Fashion-MNIST and the Tux Paint stamps.

Fashion-MNIST and Tux Paint come from Debian packages (``dataset-fashion-mnist``,
``tuxpaint-stamps-default``); a missing package raises ``MissingDatasetError`` naming the
``apt-get install`` command.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import heapq
import io
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from clip_data.errors import MissingDatasetError, SourceError
from clip_data.records import RawRecord

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    *("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"),
    *("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)
TUXPAINT_ROOT = "/usr/share/tuxpaint/stamps"
#: Training captions of Fashion-MNIST: templates and names chosen so that no caption is a
#: prompt of any evaluation template list (clip_core.zeroshot, configs/demo-suite.yaml), so
#: the zero-shot evaluation stays zero-shot in wording (tests/test_corpora.py checks it).
#: ``{}`` is a noun phrase with its article, drawn from :data:`FASHION_NAMES`.
FASHION_TRAIN_TEMPLATES: tuple[str, ...] = (
    *("{} on a plain dark background.", "a grey catalogue shot of {}.", "product image: {}"),
    *("a small greyscale scan of {}.", "{}, seen from the front.", "a shop listing for {}."),
    *("{} in a product photo.", "{} laid out flat.", "a thumbnail that shows {}."),
    *("a studio picture showing {}.", "a wardrobe piece: {}", "{} in a clothing store."),
)
#: Noun phrases per class: the class name itself and synonyms (eval uses the class name).
FASHION_NAMES: tuple[tuple[str, ...], ...] = (
    ("a t-shirt/top", "a t-shirt", "a tee", "a top", "a short-sleeved tee"),
    ("a trouser", "a pair of trousers", "a pair of pants", "some slacks"),
    ("a pullover", "a sweater", "a jumper", "a knitted pullover"),
    ("a dress", "a frock", "a summer dress", "a gown"),
    ("a coat", "a jacket", "an overcoat", "a winter coat"),
    ("a sandal", "a pair of sandals", "an open-toe sandal", "a flip-flop"),
    ("a shirt", "a button-up shirt", "a blouse", "a collared shirt"),
    ("a sneaker", "a trainer", "a running shoe", "a sports shoe"),
    ("a bag", "a handbag", "a purse", "a tote bag"),
    ("an ankle boot", "a boot", "a short boot", "a bootie"),
)
#: Share of the Tux Paint stamps held out (``part="test"``), chosen by a hash of the key.
TUXPAINT_TEST_PERCENT = 20


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


def check_fashion_mnist(root: str = FASHION_MNIST_ROOT) -> None:
    """Raise :class:`MissingDatasetError` (naming the fix) unless all four files are there."""
    for prefix in ("train", "t10k"):
        for part in ("images-idx3", "labels-idx1"):
            _fashion_path(root, prefix, part)


def check_tuxpaint(root: str = TUXPAINT_ROOT) -> None:
    """Raise :class:`MissingDatasetError` (naming the fix) unless the stamps are there."""
    if not Path(root).is_dir():
        raise MissingDatasetError(
            f"Tux Paint stamps not found ({root} is missing); install them with "
            "`apt-get install tuxpaint-stamps-default`"
        )


def source_requirements(uri: str) -> list[Callable[[], None]]:
    """Checks of the system datasets a built-in corpus ``uri`` reads (empty for any other
    source): each raises :class:`MissingDatasetError` with the install command."""
    name = uri.split(":", 1)[0]
    if name == "fashion-mnist":
        return [check_fashion_mnist]
    if name == "tuxpaint":
        return [check_tuxpaint]
    if name != "demo-mix":
        return []
    counts = _demo_mix_counts(uri, DEMO_MIX_DEFAULTS)
    checks: list[Callable[[], None]] = []
    if counts["fashion"]:
        checks.append(check_fashion_mnist)
    if counts["tuxpaint"]:
        checks.append(check_tuxpaint)
    return checks


def fashion_caption(index: int, label: int) -> str:
    """Deterministic training caption of Fashion-MNIST image ``index`` with class ``label``.

    A template of :data:`FASHION_TRAIN_TEMPLATES` around the class name or a synonym
    (:data:`FASHION_NAMES`); the first name, the evaluation's class name, is used in a
    third of the captions.
    """
    mixed = (index * 2654435761 + label * 40503) % 2**32
    names = FASHION_NAMES[label]
    name = names[0] if mixed % 3 == 0 else names[1 + (mixed >> 8) % (len(names) - 1)]
    return FASHION_TRAIN_TEMPLATES[(mixed >> 16) % len(FASHION_TRAIN_TEMPLATES)].format(name)


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


def tuxpaint_part(key: str) -> str:
    """``"test"`` for the held-out stamps (:data:`TUXPAINT_TEST_PERCENT` of the keys), else
    ``"train"``; a hash of the key, so the parts stay fixed when stamps are added."""
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "test" if digest % 100 < TUXPAINT_TEST_PERCENT else "train"


def read_tuxpaint(
    uri: str = "tuxpaint",
    *,
    root: str = TUXPAINT_ROOT,
    flatten: bool = True,
    limit: int | None = None,
    split: str = "train",
    part: str = "all",
) -> Iterator[RawRecord]:
    """Tux Paint stamps from the Debian package ``tuxpaint-stamps-default``.

    Every ``**/*.png`` except under ``symbols/`` and ``*/cartoon/``; the caption is the first
    line of the ``.txt`` beside it (``None`` when absent); ``extra = {"category": top folder}``.
    With ``flatten`` the RGBA cut-out is pasted onto white and re-encoded as RGB PNG.
    ``part``: ``"all"``, or only the ``"train"`` or held-out ``"test"`` stamps
    (:func:`tuxpaint_part`). Records get ``split`` as their split.
    Raises :class:`MissingDatasetError` when the package is not installed.
    """
    stamps = _tuxpaint_stamps(root, part)
    for path, key, category in stamps if limit is None else stamps[:limit]:
        text = path.with_suffix(".txt")
        lines = text.read_bytes().splitlines() if text.is_file() else []
        image = _flatten_on_white(path.read_bytes()) if flatten else path.read_bytes()
        caption = lines[0].strip() if lines else None
        yield RawRecord(key, image, caption, uri, split, {"category": category})


def _tuxpaint_stamps(root: str, part: str) -> list[tuple[Path, str, str]]:
    """``(path, key, category)`` of the stamps of ``part`` in key order, no file read."""
    if part not in ("all", "train", "test"):
        raise SourceError(f"unknown tuxpaint part {part!r}; use all, train or test")
    check_tuxpaint(root)
    base = Path(root)
    found = []
    for path in sorted(base.rglob("*.png")):
        parts = path.relative_to(base).parts
        if len(parts) < 2 or parts[0] == "symbols" or "cartoon" in parts[1:-1]:
            continue
        key = path.relative_to(base).with_suffix("").as_posix()
        if part == "all" or tuxpaint_part(key) == part:
            found.append((path, key, parts[0]))
    return found


#: Sizes of :func:`read_demo_mix` when neither the name nor the caller gives them.
DEMO_MIX_DEFAULTS = {"synthetic": 2048, "synthetic_test": 512, "fashion": 8000, "tuxpaint": 1}


def _demo_mix_counts(uri: str, given: dict[str, int]) -> dict[str, int]:
    """The demo mix's sizes and seed: ``given``, overridden by the options in ``uri``."""
    named = _parse_name_options(uri, "demo-mix")
    unknown = sorted(set(named) - {*DEMO_MIX_DEFAULTS, "seed"})
    if unknown:
        raise SourceError(f"unknown demo-mix option(s) {unknown} in {uri!r}")
    try:
        return {key: int(named.get(key, value)) for key, value in given.items()}
    except ValueError as error:
        raise SourceError(f"bad demo-mix options in {uri!r}: {error}") from None


def read_demo_mix(
    uri: str = "demo-mix",
    *,
    synthetic: int = DEMO_MIX_DEFAULTS["synthetic"],
    synthetic_test: int = DEMO_MIX_DEFAULTS["synthetic_test"],
    fashion: int = DEMO_MIX_DEFAULTS["fashion"],
    tuxpaint: int = DEMO_MIX_DEFAULTS["tuxpaint"],
    seed: int = 0,
    fashion_root: str = FASHION_MNIST_ROOT,
    tuxpaint_root: str = TUXPAINT_ROOT,
) -> Iterator[RawRecord]:
    """The demo's pretraining mix, interleaved so every shard holds the same proportions.

    ``synthetic`` training pairs (plus ``synthetic_test`` held-out ones, split ``test``) of
    :func:`read_synthetic` at 64 px, the first ``fashion`` Fashion-MNIST training images
    captioned by :func:`fashion_caption`, and the training part of the Tux Paint stamps
    with their own captions in ``tuxpaint`` views each (0: none; 1: as they are; up to 4:
    also mirrored and shrunk, see :func:`_stamp_view`; keys ``tuxpaint/KEY[@VIEW]``). The
    Fashion-MNIST test split and the held-out stamps are never read. Options may be given in
    the name:
    ``"demo-mix:synthetic=1024,fashion=4000,tuxpaint=0"``.
    """
    given = {"synthetic": synthetic, "synthetic_test": synthetic_test, "fashion": fashion}
    counts = _demo_mix_counts(uri, {**given, "tuxpaint": tuxpaint, "seed": seed})
    n_syn, n_test, n_fashion = counts["synthetic"], counts["synthetic_test"], counts["fashion"]
    use_tux, seed = counts["tuxpaint"], counts["seed"]
    if n_fashion:
        check_fashion_mnist(fashion_root)  # before any work: a missing package fails at once
    if use_tux:
        check_tuxpaint(tuxpaint_root)
    streams: list[tuple[int, Iterator[RawRecord]]] = []  # (length, lazy records)
    if n_syn or n_test:
        spec = f"synthetic:train={n_syn},test={n_test},seed={seed},image_size=64"
        synthetic_records = (dataclasses.replace(r, source=uri) for r in read_synthetic(spec))
        streams.append((n_syn + n_test, synthetic_records))
    if n_fashion:
        available = fashion_mnist_sizes(fashion_root)["train"]
        fashion_records = read_fashion_mnist(
            uri, root=fashion_root, splits=("train",), limit=n_fashion
        )
        streams.append((min(n_fashion, available), fashion_records))
    if use_tux:
        count = len(_tuxpaint_stamps(tuxpaint_root, "train"))
        streams.append((count * use_tux, _stamp_views(uri, tuxpaint_root, use_tux)))
    yield from _interleave(streams)


def _stamp_views(uri: str, root: str, views: int) -> Iterator[RawRecord]:
    """The training stamps in ``views`` views each: all of view 0, then all of view 1, ..."""
    for view in range(views):
        for r in read_tuxpaint(uri, root=root, part="train"):
            key = f"tuxpaint/{r.key}" + (f"@{view}" if view else "")
            yield dataclasses.replace(r, key=key, image=_stamp_view(r.image, view))


def _stamp_view(image: bytes | None, view: int) -> bytes | None:
    """View ``view`` of a flattened stamp: 0 itself, 1 mirrored, 2 shrunk to 3/4 on white,
    3 both (a stamp has few pixels of its own: more views of the same caption)."""
    if image is None or view % 4 == 0:
        return image
    from PIL import Image, ImageOps

    from clip_core.synthetic import encode_png

    with Image.open(io.BytesIO(image)) as opened:
        picture = opened.convert("RGB")
    if view % 2:
        picture = ImageOps.mirror(picture)
    if view % 4 >= 2:
        small = picture.resize((max(picture.width * 3 // 4, 1), max(picture.height * 3 // 4, 1)))
        canvas = Image.new("RGB", picture.size, (255, 255, 255))
        canvas.paste(
            small, ((picture.width - small.width) // 2, (picture.height - small.height) // 2)
        )
        picture = canvas
    return encode_png(picture)


def _interleave(streams: Sequence[tuple[int, Iterator[RawRecord]]]) -> Iterator[RawRecord]:
    """Merge lazy streams of known lengths so that each is spread evenly over the output:
    record ``i`` of a stream of ``n`` is placed at ``(i + 0.5) / n`` (ties: stream order)."""
    heap = [(0.5 / n, which, 0) for which, (n, _) in enumerate(streams) if n > 0]
    heapq.heapify(heap)
    while heap:
        _, which, position = heapq.heappop(heap)
        length, records = streams[which]
        record = next(records, None)
        if record is None:
            raise SourceError(f"demo-mix: stream {which} ended after {position} of {length} rows")
        yield record
        if position + 1 < length:
            heapq.heappush(heap, ((position + 1.5) / length, which, position + 1))


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
