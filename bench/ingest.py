"""Ingest throughput against the bare cost of reading and decoding the same images.

Baseline (same session, same files): one Python loop that reads each image file and fully
decodes it with Pillow. Measured: ``clip_data.ingest.ingest`` (read, validate with a full
decode, hash, dedupe, write Parquet shards) from a folder source and from WebDataset tars, with
1 and 2 worker processes (with 2 workers and several tars, each worker streams whole tars
itself: :mod:`clip_data.wds_ingest`). For reference, a second bare loop decodes each JPEG the
way the ingest's check does (:func:`clip_core.transforms.verify_image`: every coefficient
entropy-decoded, pixels reconstructed at 1/8 scale); every ratio is still against the
ordinary full RGB decode. Variants alternate over ``--rounds``; the median and the
best round of each are reported, each against the same statistic of the bare decode (on a
shared, busy machine the best round is the least disturbed one). The CPU columns count this
process only (``time.process_time``): for the bare decode and the 1-worker ingests that is all
the work, so their CPU ratio is the per-core efficiency, less disturbed by other load; with 2
workers it is the parent's share (listing, writing, hashing), the part that does not scale.
A bare decode also runs right before every variant; ``paired`` is the median over the rounds
of (CPU of that bare decode / CPU of the variant), which slow drifts in load move least.

    .venv/bin/python -m bench.ingest [--rows 2000] [--size 256] [--rounds 2] [--tars 8]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

#: The baseline every ratio is taken against.
BARE = "bare decode (1 core)"


def make_sources(root: Path, rows: int, size: int, tars: int = 8) -> tuple[Path, Path]:
    """A folder of JPEGs with .txt captions and the same pairs as ``tars`` WebDataset tars
    (sample ``i`` in tar ``i % tars``, as img2dataset spreads samples over many shards)."""
    folder, shards = root / "folder", root / "wds"
    folder.mkdir()
    shards.mkdir()
    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(tarfile.open(shards / f"{i:05d}.tar", "w")) for i in range(tars)
        ]
        _fill(folder, files, rows, size)
    return folder, shards


def _fill(folder: Path, tars: list[tarfile.TarFile], rows: int, size: int) -> None:
    from clip_core.synthetic import SyntheticConfig, generate

    for i, sample in enumerate(generate(rows, "train", SyntheticConfig(image_size=size))):
        buf = io.BytesIO()
        sample.image.save(buf, format="JPEG", quality=90)
        image, caption = buf.getvalue(), sample.caption.encode()
        key = f"{i:08d}"
        (folder / f"{key}.jpg").write_bytes(image)
        (folder / f"{key}.txt").write_bytes(caption)
        for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tars[i % len(tars)].addfile(info, io.BytesIO(data))


def bare_decode(folder: Path, full: bool = True) -> int:
    """Read and fully decode every image with Pillow in one loop; returns the count.

    ``full=False``: decode each JPEG as the ingest's check does
    (:func:`clip_core.transforms.verify_image`: to YCbCr, reconstructed at 1/8 scale).
    """
    n = 0
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            if not full:
                img.draft("YCbCr", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        n += 1
    return n


def timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, rows) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    rows = fn()
    return time.perf_counter() - start, time.process_time() - cpu, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Build the sources, alternate the variants, print rows/s and ratios to bare decode."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tars", type=int, default=8, help="WebDataset shards (default 8)")
    args = p.parse_args(argv)

    from clip_data.ingest import IngestConfig, ingest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, shards = make_sources(root, args.rows, args.size, args.tars)

        def run(source: Path, workers: int) -> Callable[[], int]:
            def go() -> int:
                cfg = IngestConfig(workers=workers)
                manifest = ingest(str(source), root / f"out-{workers}", cfg, progress=False)
                return int(manifest["counts"]["accepted"])

            return go

        variants: dict[str, Callable[[], int]] = {
            BARE: lambda: bare_decode(folder),
            "bare decode as the check does": lambda: bare_decode(folder, full=False),
            "ingest folder, 1 worker": run(folder, 1),
            "ingest folder, 2 workers": run(folder, 2),
            "ingest webdataset, 1 worker": run(shards, 1),
            "ingest webdataset, 2 workers": run(shards, 2),
        }
        run(folder, 2)()  # warm-up: starts the forkserver and imports once
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        paired: dict[str, list[float]] = {name: [] for name in variants}
        bare = variants[BARE]
        for _ in range(args.rounds):
            for name, fn in variants.items():
                # A bare decode right before each variant: its CPU time, paired with the
                # variant's, gives a ratio that drifting load on a shared machine moves less.
                _, bare_used, _ = timed(bare)
                elapsed, used, rows = timed(fn)
                if rows != args.rows:
                    raise SystemExit(f"{name}: {rows} rows accepted, expected {args.rows}")
                seconds[name].append(elapsed)
                cpu[name].append(used)
                paired[name].append(bare_used / used)
    print(f"WebDataset source: {args.tars} tar shards")
    _report(args.rows, args.size, args.rounds, seconds=seconds, cpu=cpu, paired=paired)
    return 0


def _report(
    rows: int,
    size: int,
    rounds: int,
    *,
    seconds: dict[str, list[float]],
    cpu: dict[str, list[float]],
    paired: dict[str, list[float]],
) -> None:
    """Print wall rates (median and best round), this process's CPU per row, and the median
    of the per-round CPU ratios to the bare decode run just before."""
    bare = BARE
    base, best_base = rows / statistics.median(seconds[bare]), rows / min(seconds[bare])
    cpu_base = statistics.median(cpu[bare])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{rows} JPEGs of {size}x{size}, {rounds} rounds, load after: {load}")
    print(
        f"{'variant':<30} {'median rows/s':>14} {'ratio':>7} {'best rows/s':>12} {'ratio':>7}"
        f" {'CPU ms/row':>11} {'CPU ratio':>10} {'paired':>7}"
    )
    for name, values in seconds.items():
        rate, best = rows / statistics.median(values), rows / min(values)
        used = statistics.median(cpu[name])
        print(
            f"{name:<30} {rate:>14.0f} {rate / base:>6.2f}x {best:>12.0f} {best / best_base:>6.2f}x"
            f" {1000 * used / rows:>11.3f} {cpu_base / used:>9.2f}x"
            f" {statistics.median(paired[name]):>6.2f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
