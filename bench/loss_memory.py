"""Memory and time of the sharded local-rows loss vs the naive full-matrix loss, on CPU.

The paper's loss lets each of W workers score only its own n pairs against the gathered
global batch N = W*n: logits [n, N] per worker instead of [N, N]. This benchmark simulates
one rank of a W-worker run in a single process and measures, for forward + backward of the
loss alone (features in, gradients of the features out):

- **local-rows**: the library's ``clip_core.loss.local_rows_loss`` as shipped, with
  ``rank_and_world`` and ``all_gather_with_grad`` replaced (inside this benchmark only) by a
  simulated gather: this rank's [n, D] features (with gradient) concatenated with the other
  W-1 ranks' features (fixed tensors, as received from the all-gather);
- **full-matrix** (baseline): ``clip_core.loss.contrastive_loss`` on the whole [N, D] batch
  in one process, which is what a loss without sharding computes on every worker.

Peak memory is *measured*, not computed: every CPU allocation and free made by torch inside
the region is recorded by torch's profiler (``profile_memory=True``) and the peak of the
running sum of allocated bytes is reported (bytes live before the region, such as the input
features, are not counted). Time is the median wall time of forward + backward over
``--repeats`` runs without the profiler, the two variants interleaved.

The default sweep keeps the per-worker batch n fixed and grows the number of workers, so
N = W*n grows the way it does when a run is scaled out: local-rows memory should grow
linearly in N (O(n x N)) and full-matrix memory quadratically (O(N^2)).

    .venv/bin/python -m bench.loss_memory [--per-worker 256] [--worlds 1 2 4 8 16]
        [--dim 512] [--repeats 5] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import clip_core.loss as loss_mod
from bench.common import machine_info

LOGIT_SCALE = 1 / 0.07


@dataclass
class Point:
    """One global batch size: measured peaks and times of both variants."""

    world: int
    per_worker: int
    global_batch: int
    dim: int
    local_peak_bytes: int
    full_peak_bytes: int
    local_ms: float
    full_ms: float
    local_logits_bytes: int  # size of one [n, N] fp32 logits matrix, for reading the peaks
    full_logits_bytes: int  # size of one [N, N] fp32 logits matrix

    @property
    def memory_ratio(self) -> float:
        """Full-matrix peak / local-rows peak."""
        return self.full_peak_bytes / max(self.local_peak_bytes, 1)

    @property
    def time_ratio(self) -> float:
        """Full-matrix time / local-rows time."""
        return self.full_ms / max(self.local_ms, 1e-9)


@contextmanager
def simulated_rank(rank: int, world: int, others: torch.Tensor) -> Iterator[None]:
    """Make ``local_rows_loss`` behave as rank ``rank`` of ``world`` without a process group.

    ``others`` [W-1, 2, n, D] are the other ranks' image (index 0) and text (index 1)
    features; the simulated all-gather places this rank's block (which keeps its gradient) at
    position ``rank``, exactly as ``all_gather_single`` orders the blocks.
    """
    original_rw, original_gather = loss_mod.rank_and_world, loss_mod.all_gather_with_grad
    calls = itertools.count()

    def rank_and_world(group: Any = None) -> tuple[int, int]:
        return rank, world

    def gather(x: torch.Tensor, group: Any = None) -> torch.Tensor:
        kind = next(calls) % 2  # local_rows_loss gathers images first, then texts
        blocks = list(others[:, kind].unbind(0))
        blocks.insert(rank, x)
        return torch.cat(blocks)  # [W*n, D]

    loss_mod.rank_and_world = rank_and_world
    loss_mod.all_gather_with_grad = gather
    try:
        yield
    finally:
        loss_mod.rank_and_world = original_rw
        loss_mod.all_gather_with_grad = original_gather


def _features(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """L2-normalised random features [rows, dim]."""
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


def peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of the bytes torch allocated on the CPU and had not yet freed while ``fn`` ran."""
    # The autograd profiler records the same allocator events as torch.profiler.profile
    # without importing torch._dynamo on first use (tens of seconds on a busy 2-core VM).
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    assert prof.kineto_results is not None
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    deltas = [int(e.nbytes()) for e in events]  # + allocation, - free
    return max(itertools.accumulate(deltas, initial=0))


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(
    world: int, per_worker: int, dim: int, repeats: int, *, seed: int = 0, rank: int | None = None
) -> Point:
    """Both variants at global batch ``world * per_worker``; ``rank`` defaults to the last."""
    g = torch.Generator().manual_seed(seed)
    n, N = per_worker, world * per_worker
    rank = world - 1 if rank is None else rank
    images, texts = _features(N, dim, g), _features(N, dim, g)  # the global batch [N, D]
    scale = torch.tensor(LOGIT_SCALE)
    own = slice(rank * n, (rank + 1) * n)
    blocks = torch.stack([images.view(world, n, dim), texts.view(world, n, dim)], dim=1)
    others = torch.cat([blocks[:rank], blocks[rank + 1 :]])  # [W-1, 2, n, D]

    def local() -> None:
        img = images[own].clone().requires_grad_(True)  # this rank's features [n, D]
        txt = texts[own].clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        with simulated_rank(rank, world, others):
            loss = loss_mod.local_rows_loss(img, txt, s)
        loss.backward()

    def full() -> None:
        img = images.clone().requires_grad_(True)  # the whole batch [N, D]
        txt = texts.clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        loss_mod.contrastive_loss(img, txt, s).backward()

    local()  # warm-up (first-call allocations, kernel selection)
    full()
    local_peak, full_peak = peak_bytes(local), peak_bytes(full)
    times: dict[str, list[float]] = {"local": [], "full": []}
    for _ in range(repeats):
        times["local"].append(_timed(local))
        times["full"].append(_timed(full))
    gc.collect()
    return Point(
        world=world,
        per_worker=n,
        global_batch=N,
        dim=dim,
        local_peak_bytes=local_peak,
        full_peak_bytes=full_peak,
        local_ms=statistics.median(times["local"]),
        full_ms=statistics.median(times["full"]),
        local_logits_bytes=4 * n * N,
        full_logits_bytes=4 * N * N,
    )


def check_equivalence(world: int = 4, per_worker: int = 8, dim: int = 16) -> float:
    """|mean over simulated ranks of the local-rows loss - full-matrix loss|.

    Guards the simulation: if the simulated gather put blocks in the wrong order or the
    wrong labels were used, the two would differ.
    """
    g = torch.Generator().manual_seed(1)
    N = world * per_worker
    images, texts = _features(N, dim, g), _features(N, dim, g)
    scale = torch.tensor(LOGIT_SCALE)
    full = float(loss_mod.contrastive_loss(images, texts, scale))
    blocks = torch.stack(
        [images.view(world, per_worker, dim), texts.view(world, per_worker, dim)], 1
    )
    total = 0.0
    for r in range(world):
        own = slice(r * per_worker, (r + 1) * per_worker)
        others = torch.cat([blocks[:r], blocks[r + 1 :]])
        with simulated_rank(r, world, others):
            total += float(loss_mod.local_rows_loss(images[own], texts[own], scale))
    return abs(total / world - full)


def sweep(worlds: Sequence[int], per_worker: int, dim: int, repeats: int) -> list[Point]:
    """One point per world size at fixed per-worker batch."""
    return [measure(w, per_worker, dim, repeats) for w in worlds]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_table(points: Sequence[Point]) -> str:
    """Markdown table of a sweep."""
    lines = [
        "| W | n | N | local-rows peak MiB | full-matrix peak MiB | memory ratio "
        "| local-rows ms | full-matrix ms | time ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.world} | {p.per_worker} | {p.global_batch} | {_mib(p.local_peak_bytes)} "
            f"| {_mib(p.full_peak_bytes)} | {p.memory_ratio:.1f}x | {p.local_ms:.1f} "
            f"| {p.full_ms:.1f} | {p.time_ratio:.1f}x |"
        )
    return "\n".join(lines)


def growth(points: Sequence[Point]) -> tuple[float, float]:
    """Log-log slopes of peak memory vs N (first to last point): (local-rows, full-matrix)."""
    import math

    a, b = points[0], points[-1]
    dn = math.log(b.global_batch / a.global_batch)
    return (
        math.log(b.local_peak_bytes / a.local_peak_bytes) / dn,
        math.log(b.full_peak_bytes / a.full_peak_bytes) / dn,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.loss_memory",
        description="Peak memory and time of local-rows vs full-matrix contrastive loss (CPU).",
    )
    p.add_argument("--per-worker", type=int, default=256, help="pairs per worker n")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16], metavar="W")
    p.add_argument("--dim", type=int, default=512, help="embedding width D (ViT-B: 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant and point")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core VM, 2 OpenMP threads make "
        "millisecond-sized ops 10-30x slower whenever another process holds a core)",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    if min(args.worlds) < 1 or args.per_worker < 1 or args.dim < 1 or args.repeats < 1:
        p.error("--worlds, --per-worker, --dim and --repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep, print the table and optionally write JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"torch {info['torch']} | threads {info['threads']} | CPU {info['cpu']} | {info['date']}")
    diff = check_equivalence()
    print(f"mean of simulated ranks' local-rows losses vs full-matrix loss: |diff| {diff:.1e}")
    if diff > 1e-5:
        raise RuntimeError(f"simulated local-rows loss disagrees with the full loss ({diff})")
    started = time.perf_counter()
    points = sweep(sorted(set(args.worlds)), args.per_worker, args.dim, args.repeats)
    elapsed = time.perf_counter() - started
    print()
    print(format_table(points))
    if len(points) > 1:
        local_slope, full_slope = growth(points)
        print(
            f"\npeak memory ~ N^k: local-rows k = {local_slope:.2f}, full-matrix k = "
            f"{full_slope:.2f} (N {points[0].global_batch} -> {points[-1].global_batch})"
        )
    print(f"total {elapsed:.1f} s")
    if args.json is not None:
        payload = {
            "machine": info,
            "elapsed_s": round(elapsed, 2),
            "points": [asdict(p) for p in points],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
