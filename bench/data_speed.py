"""Data mode of ``bench.speed``: pairs/s of clip_train's Ray Data input pipeline, per CPU core.

The pipeline is the one ``clip_train.run.train`` builds (``clip_train.data.build_dataset``:
row groups -> read, decode, random crop + resize, tokenise), iterated the way the training
loop does (``iter_torch_batches`` with prefetch and a local shuffle buffer), without a model,
on a fresh local Ray cluster (``address="local"``, never a running one) with ``cpus`` logical
CPUs and one CPU per preprocessing task, so at most ``cpus`` tasks decode at once. The first
batch (Ray start-up, worker imports) is not timed. Per-core pairs/s = delivered pairs/s /
``cpus``. As a reference, the same map function (``clip_train.data.load_units``) is also timed
serially in this process (one core, no Ray). Last, the prefetch comparison: the tiny
recipe's model and ``Stepper`` trained on the pipeline, ``prefetch_batches`` 0 vs 4.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def _dataset(cfg: Any, job: Any, urls: list[str], size: int) -> Any:
    """``clip_train``'s Ray Data pipeline at ``size`` px, one CPU per preprocessing task."""
    from clip_train.run import training_dataset

    return training_dataset(cfg, job, urls, image_size=size, preprocess_cpus=1.0)


def _batches(cfg: Any, ds: Any, prefetch: int) -> Any:
    """The training loop's iterator (``clip_train.loop._train_epoch``) over ``ds``."""
    return ds.iter_torch_batches(
        batch_size=cfg.per_worker_batch,
        drop_last=True,
        prefetch_batches=prefetch,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer,
        local_shuffle_seed=0,
    )


@contextmanager
def _closing(batches: Any) -> Iterator[Any]:
    """Iterate ``batches`` and close it on exit, so Ray Data stops its executor and threads
    before the next dataset (or ``ray.shutdown``) instead of streaming on in the background.

    The datasets are also limited to the rows used, so every iteration ends by itself (an
    iterator left mid-stream made ``ray.shutdown`` kill the process).
    """
    it = iter(batches)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        del it
        gc.collect()


def _ray_rate(cfg: Any, job: Any, urls: list[str], size: int, rows: int) -> float:
    """Pairs/s the Ray Data pipeline delivers at ``size`` px, after the first batch."""
    delivered, start = 0, 0.0
    ds = _dataset(cfg, job, urls, size).limit(rows + cfg.per_worker_batch)  # ends by itself
    with _closing(_batches(cfg, ds, prefetch=4)) as batches:
        for i, b in enumerate(batches):
            if i == 0:
                start = time.perf_counter()
                continue
            delivered += int(b["image"].shape[0])
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


def _loop_rate(cfg: Any, job: Any, urls: list[str], prefetch: int, steps: int) -> float:
    """Pairs/s of the tiny recipe's model trained on the pipeline (``Stepper``, fp32, 1 thread).

    The first step (pipeline start-up) is not timed.
    """
    from clip_train.loop import build_model
    from clip_train.optim import build_optimizer
    from clip_train.step import Stepper

    model = build_model(job, cfg.seed)
    o = cfg.optim
    optimizer = build_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    stepper = Stepper(
        model,
        raw=model,
        optimizer=optimizer,
        optim=o,
        precision=cfg.precision,
        device=torch.device("cpu"),
    )
    size = int(job.model_config["vision"]["image_size"])
    start, done = 0.0, 0
    ds = _dataset(cfg, job, urls, size).limit((steps + 1) * cfg.per_worker_batch)
    with _closing(_batches(cfg, ds, prefetch)) as batches:
        for i, b in enumerate(batches):
            stepper.step(b["image"], b["tokens"], o.lr)
            if i == 0:
                start = time.perf_counter()
                continue
            done += int(b["image"].shape[0])
    return done / (time.perf_counter() - start)


def _prefetch_rates(
    cfg: Any, job: Any, urls: list[str], steps: int, repeats: int
) -> dict[int, float]:
    """Median pairs/s of the training loop on the pipeline without and with prefetch (0, 4).

    Runs alternate (0, 4, 0, 4, ...); the model steps with the recipe's torch threads (1),
    as a tiny-recipe worker does, and the preprocessing tasks share the remaining cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.infra.torch_threads)
    rates: dict[int, list[float]] = {0: [], 4: []}
    try:
        for _ in range(repeats):
            for prefetch, runs in rates.items():
                runs.append(_loop_rate(cfg, job, urls, prefetch, steps))
                print(f"  loop, prefetch {prefetch}: {runs[-1]:.1f} pairs/s", flush=True)
    finally:
        torch.set_num_threads(threads)
    return {k: statistics.median(v) for k, v in rates.items()}


def bench_data(
    shards: Path, cpus: int, rows: int, sizes: list[int], loop_steps: int = 24
) -> tuple[list[DataResult], dict[int, float]]:
    """Ray Data and serial pairs/s at each image size; loop pairs/s by prefetch depth.

    ``loop_steps`` 0 skips the prefetch comparison.
    """
    import ray
    import ray.data

    cfg, job, urls = _plan(shards)
    results = []
    ray.init(address="local", num_cpus=cpus, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
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
        prefetch = _prefetch_rates(cfg, job, urls, loop_steps, 2) if loop_steps else {}
    finally:
        ray.shutdown()
    return results, prefetch


def format_prefetch(rates: dict[int, float]) -> str:
    """One line: loop pairs/s without and with prefetch, and the speed-up."""
    if not rates:
        return ""
    return (
        f"training loop on the pipeline (tiny recipe, 1 thread): prefetch 0 {rates[0]:.1f} "
        f"pairs/s, prefetch 4 {rates[4]:.1f} pairs/s: {rates[4] / rates[0]:.2f}x"
    )


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
