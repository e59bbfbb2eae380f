"""Training start-up: the shard list and row counts from the ingest manifest vs a footer scan.

Before a pretraining run starts its Ray Data pipeline, the driver needs every shard's row
groups and row counts. ``clip_train`` takes them from the ingest manifest
(``clip_train.data.read_manifest_any`` + ``shard_urls`` + ``manifest_units``: one file read,
whatever the number of shards). The baseline is what the driver did before: open every
shard and read its Parquet footer, one after another (``clip_train.data.row_group_units``).

The shard directory is built once per size: one real ingest shard (``clip_data.ingest`` on the
synthetic source: 32 rows in 4 row groups) copied ``n`` times under new names, and a manifest
listing every copy, on local disk and, with ``--s3``, uploaded to an S3-compatible endpoint on
loopback (moto's threaded server; uploads are set-up, not timed). Both paths must give the same
units before anything is timed. Each size alternates manifest and scan over ``--rounds`` and
reports medians; the ratio is scan / manifest. ``growth`` is the time at each size over the
time at the smallest (linear growth in shards = the size ratio).

    .venv/bin/python -m bench.data_startup [--shards 1000 3000 10000] [--s3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import load_average, machine_info, machine_line

BUCKET = "clipops-startup-bench"


@dataclass
class StartupResult:
    """Start-up of one shard directory: the manifest path against the serial footer scan."""

    where: str  # "local" or "s3"
    shards: int
    units: int  # row groups found
    manifest_s: float  # median seconds: manifest -> units
    scan_s: float  # median seconds: a footer per shard -> units
    ratio: float  # scan_s / manifest_s


def template_shard(root: Path) -> tuple[Path, dict[str, Any]]:
    """One real ingest shard (32 rows in 4 row groups), and the manifest it came with."""
    from clip_data.ingest import IngestConfig, ingest
    from clip_data.shard_format import ShardConfig, read_manifest

    dest = root / "template"
    layout = ShardConfig(target_shard_bytes=1 << 30, row_group_rows=8)
    config = IngestConfig(workers=1, shards=layout)
    ingest("synthetic:train=32,test=0,image_size=16", dest, config, progress=False)
    manifest = read_manifest(dest)
    (shard,) = manifest["shards"]
    return dest / shard["file"], manifest


def replicate(template: Path, manifest: dict[str, Any], dest: Path, n: int) -> dict[str, Any]:
    """``dest`` with ``n`` copies of ``template`` and a manifest listing them all."""
    from clip_data.shard_format import MANIFEST_NAME, shard_name

    dest.mkdir(parents=True)
    entry = manifest["shards"][0]
    shards = []
    for i in range(n):
        name = shard_name(i)
        shutil.copyfile(template, dest / name)
        shards.append({**entry, "file": name})
    counts = {
        **manifest["counts"],
        "read": int(entry["rows"]) * n,
        "accepted": int(entry["rows"]) * n,
        "per_split": {k: int(v) * n for k, v in manifest["counts"]["per_split"].items()},
    }
    out = {**manifest, "shards": shards, "counts": counts}
    (dest / MANIFEST_NAME).write_text(json.dumps(out), encoding="utf-8")
    return out


def upload(client: Any, local: Path, prefix: str) -> str:
    """Every file of ``local`` under ``s3://BUCKET/prefix`` (8 threads); the URL."""
    files = sorted(p for p in local.iterdir() if p.is_file())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), BUCKET, f"{prefix}/{p.name}"), files))
    return f"s3://{BUCKET}/{prefix}"


def from_manifest(shards: str) -> list[dict[str, Any]]:
    """The driver's start-up as shipped: the manifest's shard list and row groups."""
    from clip_train.data import manifest_units, read_manifest_any, shard_urls

    manifest = read_manifest_any(shards)
    units = manifest_units(shard_urls(shards, manifest), manifest)
    if units is None:
        raise RuntimeError(f"{shards}: the manifest has no row_groups per shard")
    return units


def from_footers(shards: str) -> list[dict[str, Any]]:
    """The baseline: the manifest's shard list, then every shard's footer, serially."""
    from clip_train.data import read_manifest_any, row_group_units, shard_urls

    return row_group_units(shard_urls(shards, read_manifest_any(shards)))


def _fresh_filesystems() -> None:
    """Forget fsspec's cached filesystems (and their listings), so no round reuses one."""
    import fsspec

    for cls in (fsspec.get_filesystem_class("file"), fsspec.get_filesystem_class("s3")):
        cls.clear_instance_cache()


def time_startup(where: str, shards: str, n: int, rounds: int) -> StartupResult:
    """Time both paths on ``shards`` alternately; raise unless they found the same units."""
    times: dict[str, list[float]] = {"manifest": [], "scan": []}
    found: dict[str, list[dict[str, Any]]] = {}
    paths: dict[str, Callable[[str], list[dict[str, Any]]]] = {
        "manifest": from_manifest,
        "scan": from_footers,
    }
    from_manifest(shards)  # warm-up: imports, the first S3 client
    for _ in range(rounds):
        for name, fn in paths.items():
            _fresh_filesystems()
            gc.collect()  # the previous round's garbage is not this one's cost
            t0 = time.perf_counter()
            found[name] = fn(shards)
            times[name].append(time.perf_counter() - t0)
    plain = [{k: u[k] for k in ("url", "row_group", "rows")} for u in found["manifest"]]
    if plain != found["scan"]:
        raise RuntimeError(f"{shards}: the manifest's row groups differ from the footers'")
    manifest_s, scan_s = (statistics.median(times[k]) for k in ("manifest", "scan"))
    return StartupResult(where, n, len(plain), manifest_s, scan_s, scan_s / manifest_s)


@contextlib.contextmanager
def loopback_s3() -> Iterator[Any]:
    """moto's S3 server on loopback, the bucket, and the AWS environment pointing at it."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = dict(os.environ)
    try:
        host, port = server.get_host_and_port()
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",  # moto's fixed test credentials
            AWS_DEFAULT_REGION="us-east-1",
        )
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


def run(sizes: Sequence[int], rounds: int, s3: bool, root: Path) -> list[StartupResult]:
    """Every size on local disk (and S3), progress printed."""
    template, manifest = template_shard(root)
    results = []
    with loopback_s3() if s3 else contextlib.nullcontext() as client:
        for n in sizes:
            local = root / f"shards-{n}"
            replicate(template, manifest, local, n)
            targets = [("local", str(local))]
            if client is not None:
                targets.append(("s3", upload(client, local, f"shards-{n}")))
            for where, url in targets:
                results.append(time_startup(where, url, n, rounds))
                print(f"  {where} {n} shards: {_row(results[-1])}", flush=True)
    return results


def _row(r: StartupResult) -> str:
    return (
        f"manifest {r.manifest_s * 1e3:.1f} ms, footer scan {r.scan_s * 1e3:.0f} ms "
        f"({r.ratio:.0f}x), {r.units} row groups"
    )


def table(results: list[StartupResult]) -> str:
    """A Markdown table, with each path's growth against its own smallest size."""
    lines = [
        "| where | shards | manifest (ms) | growth | footer scan (ms) | growth | scan / manifest |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    first: dict[str, StartupResult] = {}
    for r in results:
        base = first.setdefault(r.where, r)
        lines.append(
            f"| {r.where} | {r.shards} | {r.manifest_s * 1e3:.1f} | "
            f"{r.manifest_s / base.manifest_s:.1f}x | {r.scan_s * 1e3:.0f} | "
            f"{r.scan_s / base.scan_s:.1f}x | {r.ratio:.0f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; sizes and rounds must be positive."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--shards", type=int, nargs="+", default=[1000, 3000, 10000])
    p.add_argument("--rounds", type=int, default=2, help="alternations per size (default 2)")
    p.add_argument("--s3", action="store_true", help="also on an S3 endpoint on loopback")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    if args.rounds < 1 or min(args.shards) < 1:
        p.error("--shards and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table (and write JSON)."""
    args = parse_args(argv)
    info = machine_info()
    print(machine_line(info, load_average()), flush=True)
    with tempfile.TemporaryDirectory(prefix="clipops-startup-") as tmp:
        results = run(sorted(args.shards), args.rounds, args.s3, Path(tmp))
    print(table(results))
    if args.json:
        payload = {"machine": info, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
