"""Steady-state pairs/s of the ``tiny`` recipe through Ray Train vs the same loop in one process.

Measured (the product path): ``clip_train.run.train`` with the ``tiny`` recipe: 2 Ray Train
workers x per-worker batch 64 (global batch 128), 1 torch thread each, DDP over gloo, the
sharded local-rows loss, Ray Data streaming decode + transform + tokenisation from the
Parquet shards in the same 2 cores. Throughput is read back from the run's MLflow history
(rank 0 logs every step here: ``tracking.log_every=1``): the wall-clock rate between the
metric timestamps of step ``--skip`` and of the last step (includes data waits, epoch
boundaries, the gradient all-reduce and the per-step MLflow write), and the median of the
per-step ``train/pairs_per_s``. The first ``--skip`` steps (Ray start-up, Ray Data warm-up,
first-step allocations) are excluded; so are mid-run checkpoints
(``checkpoint.every_steps`` = the step count; ``--checkpoint-every`` puts them back).

Baselines, in the same process, interleaved with the Ray runs (plain A, plain B, Ray, ...):

- **plain-decoded:T**: the same model (``clip_train.loop.build_model``), optimiser,
  schedule and ``clip_train.step.Stepper`` (no DDP, no process group), global batch 128 in
  one process with T torch threads, fed from tensors decoded before timing (the
  compute-only upper bound). T=2 is the same total CPU as 2 workers x 1 thread; T=1 is the
  per-process threading of a Ray worker (on a shared machine, 2 OpenMP threads are slowed
  far more than 2 single-threaded processes when another job holds a core);
- **plain-inline:T**: the same, with each batch decoded, transformed and tokenised by
  ``clip_train.data.load_units`` in the loop (the same per-row work as the Ray Data stage,
  done serially).

The ratio to read is Ray's wall rate over the plain wall rate (overhead = 1 - ratio).

    .venv/bin/python -m bench.train_ray [--steps 64] [--skip 8] [--repeats 3]
        [--variants plain-inline:2 ray] [--workdir /tmp/bench-train]
        [--shards /tmp/bench-shards-8k] [--json OUT]

Defaults: one epoch of 64 steps covers the measured window (epoch-boundary stalls are a
per-epoch cost, negligible in production epochs of thousands of steps), against the fair
baseline that decodes in its own loop on the same 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import load_average, machine_info

DEFAULT_SOURCE = "synthetic:train=8192,test=64,seed=0,image_size=64"  # one 64-step epoch
PLAIN_KINDS = ("plain-decoded", "plain-inline")
DEFAULT_VARIANTS = ("plain-inline:2", "ray")  # the fair baseline decodes in its loop too


@dataclass
class Measurement:
    """One run of one variant."""

    variant: str
    steps: int
    skip: int
    wall_pairs_per_s: float  # (steps - skip) * batch / wall time after step `skip`
    median_step_pairs_per_s: float  # median of per-step batch / step time (after skip)
    total_s: float  # the whole call, start-up included
    step_pairs_per_s: list[float] = field(default_factory=list)


def ensure_shards(shards: Path, source: str) -> None:
    """Ingest the synthetic corpus into ``shards`` unless a manifest is already there."""
    if (shards / "manifest.json").is_file():
        return
    clipops = Path(sys.executable).with_name("clipops")
    subprocess.run([str(clipops), "ingest", source, str(shards)], check=True)


def run_config(args: argparse.Namespace, run_name: str, workdir: Path) -> Any:
    """The tiny recipe pointed at the bench shards, storage and tracking under ``workdir``."""
    from clip_train.config import load_run_config

    every = args.checkpoint_every or args.steps
    return load_run_config(
        "tiny",
        [
            f"data.shards={args.shards}",
            f"optim.max_steps={args.steps}",
            f"checkpoint.every_steps={every}",
            f"infra.storage_path={workdir / 'runs'}",
            f"infra.run_name={run_name}",
            f"infra.num_workers={args.workers}",
            f"tracking.uri=sqlite:///{workdir / 'mlruns.db'}",
            "tracking.log_every=1",
        ],
    )


def _summarise(
    variant: str, steps: int, skip: int, batch: int, ends: list[float], *, total: float
) -> Measurement:
    """``ends[i]``: time at the end of step i+1 (seconds; index 0 = end of step 1)."""
    per_step = [batch / (b - a) for a, b in zip(ends[skip - 1 : -1], ends[skip:], strict=True)]
    wall = (len(ends) - skip) * batch / (ends[-1] - ends[skip - 1])
    return Measurement(
        variant=variant,
        steps=steps,
        skip=skip,
        wall_pairs_per_s=wall,
        median_step_pairs_per_s=statistics.median(per_step),
        total_s=total,
        step_pairs_per_s=[round(x, 2) for x in per_step],
    )


def ray_run(args: argparse.Namespace, workdir: Path, index: int) -> Measurement:
    """One ``clip_train.run.train`` call; step times from rank 0's MLflow metric timestamps."""
    import ray
    from mlflow.tracking import MlflowClient

    from clip_train.run import train

    cfg = run_config(args, f"bench-ray-{int(time.time())}-{index}", workdir)
    start = time.perf_counter()
    try:
        result = train(cfg, log=lambda line: print(f"    {line}", flush=True))
    finally:
        ray.shutdown()
    total = time.perf_counter() - start
    if result.mlflow_run_id is None:
        raise RuntimeError("the run has no MLflow run id")
    client = MlflowClient(cfg.tracking.uri)
    history = client.get_metric_history(result.mlflow_run_id, "train/pairs_per_s")
    by_step = {m.step: m for m in history}
    if sorted(by_step) != list(range(1, args.steps + 1)):
        raise RuntimeError(f"MLflow history has steps {sorted(by_step)}, want 1..{args.steps}")
    ends = [by_step[s].timestamp / 1e3 for s in range(1, args.steps + 1)]
    m = _summarise("ray", args.steps, args.skip, cfg.data.global_batch_size, ends, total=total)
    # MLflow timestamps have 1 ms resolution; rank 0's own per-step figure is finer.
    m.step_pairs_per_s = [round(by_step[s].value, 2) for s in range(args.skip + 1, args.steps + 1)]
    m.median_step_pairs_per_s = statistics.median(m.step_pairs_per_s)
    return m


class PlainLoop:
    """The training loop of one Ray worker, in this process, on the whole global batch."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from clip_train.data import row_group_units
        from clip_train.loop import build_model
        from clip_train.optim import build_optimizer
        from clip_train.run import plan
        from clip_train.step import Stepper

        self.cfg = cfg = run_config(args, "bench-plain", workdir)
        self.job, urls, _ = plan(cfg)
        self.units = row_group_units(urls)
        self.args = args
        self.kwargs: dict[str, Any] = {
            "split": cfg.data.split,
            "chunk": cfg.data.preprocess_batch,
            "merges": tuple(self.job.merges),
            "context_length": self.job.context_length,
            "image_size": int(self.job.model_config["vision"]["image_size"]),
            "scale": cfg.data.train_scale,
            "seed": cfg.seed,
        }
        o = cfg.optim
        self.model = build_model(self.job, cfg.seed)
        optimizer = build_optimizer(self.model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
        self.stepper = Stepper(
            self.model,
            raw=self.model,
            optimizer=optimizer,
            optim=o,
            precision=cfg.precision,
            device=torch.device("cpu"),
        )
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.decoded: tuple[torch.Tensor, torch.Tensor] | None = None

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        from clip_train.data import load_units

        for unit in self.units:
            batch = {"url": np.array([unit["url"]]), "row_group": np.array([unit["row_group"]])}
            yield from load_units(batch, **self.kwargs)

    def _inline_batches(self, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches decoded as they are needed, epoch after epoch, in a per-epoch order."""
        epoch = 0
        while True:
            rng = np.random.default_rng(epoch)
            images: list[np.ndarray] = []
            tokens: list[np.ndarray] = []
            rows = 0
            for chunk in self._chunks():
                images.append(chunk["image"])
                tokens.append(chunk["tokens"])
                rows += len(chunk["image"])
                while rows >= batch:
                    img, tok = np.concatenate(images), np.concatenate(tokens)
                    order = rng.permutation(batch)
                    yield torch.from_numpy(img[:batch][order]), torch.from_numpy(tok[:batch][order])
                    images, tokens, rows = [img[batch:]], [tok[batch:]], rows - batch
            epoch += 1

    def _decoded_batches(self, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches sliced from tensors decoded once, reshuffled every epoch."""
        if self.decoded is None:
            chunks = list(self._chunks())
            self.decoded = (
                torch.from_numpy(np.concatenate([c["image"] for c in chunks])),
                torch.from_numpy(np.concatenate([c["tokens"] for c in chunks])),
            )
        images, tokens = self.decoded
        epoch = 0
        while True:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
            for start in range(0, len(order) - batch + 1, batch):
                idx = order[start : start + batch]
                yield images[idx], tokens[idx]
            epoch += 1

    def run(self, variant: str) -> Measurement:
        """``variant``: "plain-decoded:T" or "plain-inline:T" (T torch threads).

        Weights and optimiser state are reset before each run.
        """
        from clip_train.optim import cosine_lr

        cfg, job, args = self.cfg, self.job, self.args
        self.model.load_state_dict(self.initial)
        self.stepper.optimizer.state.clear()
        batch = cfg.data.global_batch_size
        previous = torch.get_num_threads()
        kind, _, threads = variant.partition(":")
        torch.set_num_threads(int(threads or 2))
        start = time.perf_counter()
        if kind == "plain-decoded":
            batches = self._decoded_batches(batch)
            next(self._decoded_batches(batch))  # decode once, before the clock matters
        else:
            batches = self._inline_batches(batch)
        ends: list[float] = []
        try:
            for step in range(args.steps):
                images, tokens = next(batches)
                lr = cosine_lr(step, cfg.optim.lr, cfg.optim.warmup_steps, job.total_steps)
                self.stepper.step(images, tokens, lr)
                ends.append(time.perf_counter())
        finally:
            torch.set_num_threads(previous)
        total = time.perf_counter() - start
        return _summarise(variant, args.steps, args.skip, batch, ends, total=total)


def _row(name: str, runs: Sequence[Measurement], base: float) -> str:
    wall = statistics.median(m.wall_pairs_per_s for m in runs)
    step = statistics.median(m.median_step_pairs_per_s for m in runs)
    each = " / ".join(f"{m.wall_pairs_per_s:.1f}" for m in runs)
    return f"| {name} | {wall:.1f} | {each} | {step:.1f} | {wall / base:.2f}x |"


def format_table(results: dict[str, list[Measurement]]) -> str:
    """Markdown table: medians over repeats, ratios against the first plain variant."""
    first = next(name for name in results if name != "ray")
    base = statistics.median(m.wall_pairs_per_s for m in results[first])
    lines = [
        f"| variant | pairs/s (wall, median) | each run | per-step pairs/s (median) | vs {first} |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        lines.append(_row(name, runs, base))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.train_ray",
        description="Steady-state pairs/s: tiny recipe on Ray Train vs one plain process.",
    )
    p.add_argument("--steps", type=int, default=64, help="optimiser steps per run")
    p.add_argument("--skip", type=int, default=8, help="leading steps left out (start-up)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--checkpoint-every", type=int, help="mid-run checkpoints (default: none)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench-train"))
    p.add_argument("--shards", type=Path, default=Path("/tmp/bench-shards-8k"))
    p.add_argument("--source", default=DEFAULT_SOURCE, help="ingested when --shards is empty")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        metavar="V",
        help="run order within a repeat: ray, plain-decoded:T, plain-inline:T (T = torch "
        f"threads); ratios are against the first plain one (default: {DEFAULT_VARIANTS})",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    if not 1 <= args.skip < args.steps:
        p.error("need 1 <= --skip < --steps")
    if args.repeats < 1 or args.workers < 1:
        p.error("--repeats and --workers must be at least 1")
    for v in args.variants:
        kind, _, threads = v.partition(":")
        if v != "ray" and (kind not in PLAIN_KINDS or not threads.isdigit() or int(threads) < 1):
            p.error(f"--variants: {v!r} is not ray, plain-decoded:T or plain-inline:T")
    if all(v == "ray" for v in args.variants):
        p.error("--variants: include a plain baseline")
    args.workdir, args.shards = args.workdir.resolve(), args.shards.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Interleave the variants ``--repeats`` times, print medians, optionally write JSON."""
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_shards(args.shards, args.source)
    info = machine_info()
    print(f"torch {info['torch']} | CPU {info['cpu']} ({info['logical_cpus']} logical) | ", end="")
    print(f"{info['date']} | load {load_average()}", flush=True)
    started = time.perf_counter()
    plain = PlainLoop(args, args.workdir)
    results: dict[str, list[Measurement]] = {v: [] for v in args.variants}
    for i in range(args.repeats):
        for variant in args.variants:
            m = ray_run(args, args.workdir, i) if variant == "ray" else plain.run(variant)
            results[variant].append(m)
            print(
                f"  [{i + 1}/{args.repeats}] {variant}: {m.wall_pairs_per_s:.1f} pairs/s wall, "
                f"median step {m.median_step_pairs_per_s:.1f} ({m.total_s:.1f} s in all)",
                flush=True,
            )
    elapsed = time.perf_counter() - started
    print()
    print(format_table(results))
    if "ray" in results:
        ray_rate = statistics.median(m.wall_pairs_per_s for m in results["ray"])
        for name, runs in results.items():
            if name != "ray":
                base = statistics.median(m.wall_pairs_per_s for m in runs)
                print(f"Ray throughput / {name}: {ray_rate / base:.2f}x")
    print(f"total {elapsed:.1f} s | load {load_average()}")
    if args.json is not None:
        payload = {
            "machine": info,
            "args": {k: str(v) for k, v in vars(args).items()},
            "elapsed_s": round(elapsed, 2),
            "results": {k: [asdict(m) for m in v] for k, v in results.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
