"""Data mode of ``bench.speed``: pairs/s of clip_train's Ray Data input pipeline, per CPU core.

The pipeline is the one ``clip_train.run.train`` builds (``clip_train.data.build_dataset``:
row groups -> read, decode, random crop + resize, tokenise), iterated the way the training
loop does (``iter_torch_batches`` with prefetch and a local shuffle buffer), without a model,
on a fresh local Ray cluster (``address="local"``, never a running one) with ``cpus`` logical
CPUs and one CPU per preprocessing task, so at most ``cpus`` tasks decode at once. The first
batch (Ray start-up, worker imports) is not timed. Per-core pairs/s = delivered pairs/s /
``cpus``. As a reference, the same map function (``clip_train.data.load_units``) is also timed
serially in this process (one core, no Ray).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class DataResult:
    """Throughput of the input pipeline at one image size."""

    image_size: int
    cpus: int
    rows: int
    pairs_per_s: float  # Ray Data pipeline, delivered to the loop
    pairs_per_s_per_core: float
    serial_pairs_per_s: float  # load_units in this process, one core


def _plan(shards: Path) -> tuple[Any, Any, list[str]]:
    """The tiny recipe pointed at ``shards``: its run config, job spec and shard URLs."""
    from clip_train.config import load_run_config
    from clip_train.run import plan

    cfg = load_run_config("tiny", [f"data.shards={shards}"])
    job, urls, _ = plan(cfg)
    return cfg, job, urls


def _ray_rate(cfg: Any, job: Any, urls: list[str], size: int, rows: int) -> float:
    """Pairs/s the Ray Data pipeline delivers at ``size`` px, after the first batch."""
    from clip_core.tokenizer import ClipTokenizer
    from clip_train.data import build_dataset

    ds = build_dataset(
        urls,
        split=cfg.data.split,
        tokenizer=ClipTokenizer.from_merges(job.merges, context_length=job.context_length),
        image_size=size,
        scale=cfg.data.train_scale,
        seed=cfg.seed,
        preprocess_cpus=1.0,
        preprocess_batch=cfg.data.preprocess_batch,
    )
    batch = cfg.per_worker_batch
    delivered, start = 0, 0.0
    for i, b in enumerate(
        ds.iter_torch_batches(
            batch_size=batch,
            drop_last=True,
            prefetch_batches=4,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer,
            local_shuffle_seed=0,
        )
    ):
        if i == 0:
            start = time.perf_counter()
            continue
        delivered += int(b["image"].shape[0])
        if delivered >= rows:
            break
    return delivered / (time.perf_counter() - start)


def _serial_rate(cfg: Any, job: Any, urls: list[str], size: int, rows: int) -> float:
    """Pairs/s of the pipeline's map function run serially here (one core, no Ray)."""
    from clip_train.data import load_units, row_group_units

    kwargs: dict[str, Any] = {
        "split": cfg.data.split,
        "chunk": cfg.data.preprocess_batch,
        "merges": tuple(job.merges),
        "context_length": job.context_length,
        "image_size": size,
        "scale": cfg.data.train_scale,
        "seed": cfg.seed,
    }
    unit = row_group_units(urls)[0]
    batch = {"url": np.array([unit["url"]]), "row_group": np.array([unit["row_group"]])}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, done = time.perf_counter(), 0
        for chunk in load_units(batch, **kwargs):
            done += len(chunk["image"])
            if done >= min(rows, int(unit["rows"])):
                break
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def bench_data(shards: Path, cpus: int, rows: int, sizes: list[int]) -> list[DataResult]:
    """Ray Data and serial pairs/s at each image size."""
    import ray

    cfg, job, urls = _plan(shards)
    results = []
    ray.init(address="local", num_cpus=cpus, log_to_driver=False)
    try:
        for size in sizes:
            rate = _ray_rate(cfg, job, urls, size, rows)
            serial = _serial_rate(cfg, job, urls, size, min(rows, 512))
            results.append(DataResult(size, cpus, rows, rate, rate / cpus, serial))
            print(
                f"  data {size} px: Ray Data {rate:.0f} pairs/s on {cpus} CPUs "
                f"({rate / cpus:.0f}/core), serial {serial:.0f} pairs/s",
                flush=True,
            )
    finally:
        ray.shutdown()
    return results


def format_data_table(results: list[DataResult], gpu_pairs_per_s: float | None) -> str:
    """Markdown table, and the cores-per-GPU line (the formula when no GPU figure is given)."""
    lines = [
        "| image px | Ray CPUs | pairs/s (Ray Data) | pairs/s per core | serial pairs/s (1 core) "
        "| cores per GPU |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        need = (
            "n/a" if gpu_pairs_per_s is None else f"{gpu_pairs_per_s / r.pairs_per_s_per_core:.1f}"
        )
        lines.append(
            f"| {r.image_size} | {r.cpus} | {r.pairs_per_s:.0f} | {r.pairs_per_s_per_core:.0f} "
            f"| {r.serial_pairs_per_s:.0f} | {need} |"
        )
    lines.append(
        "\ncores per GPU = GPU training pairs/s / Ray Data pairs/s per core"
        + ("" if gpu_pairs_per_s is None else f" (GPU figure: {gpu_pairs_per_s:.0f} pairs/s)")
    )
    return "\n".join(lines)
