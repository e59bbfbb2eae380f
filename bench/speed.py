"""Training throughput of clip_core/clip_train, optimisation by optimisation (issue 10).

One call, one table. Three modes (``--mode``):

**cpu** (default; every machine): pairs/s of forward + loss + backward + AdamW step +
logit-scale clamp, fp32, random inputs at each model's resolution (EOS at a random spot), for
``tiny-vit`` (the ``tiny`` recipe: 64 px, per-worker batch 64), ``tiny-rn`` and ViT-B-32
(batch 8). Every variant is the same weights in the same process:

- ``baseline``: eager fp32, naive attention (``softmax(Q K^T / sqrt d) V`` with a mask
  tensor, ``bench.train_step``), for-loop AdamW (``foreach=False, fused=False``), and the
  naive full-matrix loss. The loss is that of one rank of a simulated 2-rank run (as in
  ``bench.loss_memory``): this rank's n pairs go through the model, the other rank's n
  features are fixed tensors; the baseline scores the whole gathered [2n, 2n] matrix;
- one optimisation on top of the baseline: ``sdpa`` (fused attention), ``foreach`` /
  ``fused`` AdamW (``clip_train.optim.build_optimizer``), ``channels-last`` (ResNet tower,
  ``ModifiedResNet.set_channels_last``), ``compile`` (``clip_train.step.compile_model``,
  inductor), ``local-rows`` (``clip_core.loss.local_rows_loss``: [n, 2n] rows only);
- ``all``: every optimisation together.

Before timing, each variant takes one step from the same weights and inputs as the baseline
and must match it: loss (relative 1e-4), gradients (max |diff| <= 1e-3 x max |grad|) and
parameter update (relative L2 norm of the difference <= 1e-2, over all weights). For
``local-rows`` the check runs both simulated ranks (their losses' mean must equal the
full-matrix loss, and its gradient the full-matrix gradient, as the all-gather's
gradient-summing backward makes it in a real run); the timed step is one rank's. Steps are
then interleaved (A B C ... A B C ...) and each variant's pairs/s is batch / median step time.

**gpu** (a CUDA device): ViT-B-32 and RN50 at per-GPU batch 256 and 512 through the product's
``clip_train.step.Stepper`` (bf16 autocast, local-rows loss, fused AdamW, fused SDPA,
channels-last for RN50, ``torch.compile`` unless ``--no-compile``): pairs/s, peak memory
(``torch.cuda.max_memory_allocated``), training FLOPs per pair (``bench.flops``: 3 x analytic
forward FLOPs of both towers) and MFU = pairs/s x FLOPs per pair / peak (989 TFLOP/s dense
bf16 for H100 SXM / H200, from the device name; ``--peak-tflops`` overrides). Then ViT-L-14
with gradient checkpointing at the largest per-GPU batch that fits (doubling from 64, then
bisection to a multiple of 32, catching ``torch.cuda.OutOfMemoryError``).

**open-clip**: ``bench.vs_open_clip``: the same model trained by open_clip (its model, loss
and AdamW, from its wheel) and by clipops (``Stepper``, fast settings), steps interleaved in
this process, after checks that both train the same model the same way; prints the ratio.

**data**: the Ray Data input pipeline of ``clip_train`` (``clip_train.data.build_dataset``,
iterated with ``iter_torch_batches`` as the training loop does, no model) on a local Ray
cluster of ``--data-cpus`` CPUs: delivered pairs/s and pairs/s per CPU core, at the tiny
recipe's 64 px and at 224 px. Cores per GPU = GPU pairs/s / per-core pairs/s. Then the
data-pipeline prefetch: the tiny recipe's model (``Stepper``, 1 thread) trained on that
pipeline with ``prefetch_batches`` 0 and 4 (the loop's setting), runs alternated.

    .venv/bin/python -m bench.speed [--mode cpu gpu data open-clip] [--models ...]
        [--compile-models ...] [--open-clip-models ...] [--steps N] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import check_args, load_average, machine_info, machine_line
from bench.cpu_speed import CPU_PLANS, CpuModelResult, bench_cpu_model, format_cpu_table
from bench.flops import peak_flops, train_flops_per_pair
from bench.train_step import make_inputs
from clip_core.model import CLIP
from clip_core.registry import create_model
from clip_core.resnet import ModifiedResNet
from clip_train.config import OptimSection, PrecisionSection
from clip_train.optim import build_optimizer
from clip_train.step import Stepper, compile_model

MODES = ("cpu", "gpu", "data", "open-clip")
GPU_MODELS = ("ViT-B-32", "RN50")
GPU_BATCHES = (256, 512)
LARGE_MODEL = "ViT-L-14"


@dataclass
class GpuResult:
    """One model at one per-GPU batch."""

    model: str
    batch: int
    precision: str
    compiled: bool
    grad_checkpointing: bool
    pairs_per_s: float
    median_step_ms: float
    peak_memory_gib: float | None
    train_flops_per_pair: int
    achieved_tflops: float
    mfu: float | None
    step_ms: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_gpu_stepper(
    name: str, device: torch.device, *, compile_model_: bool, grad_checkpointing: bool
) -> tuple[CLIP, Stepper]:
    """The product's training step for ``name`` on ``device`` with every optimisation on."""
    torch.manual_seed(0)
    model = create_model(name).to(device)
    if isinstance(model.visual, ModifiedResNet):
        model.visual.set_channels_last(True)
    model.set_grad_checkpointing(grad_checkpointing)
    optim = OptimSection(lr=5e-4, weight_decay=0.2)
    optimizer = build_optimizer(
        model,
        optim.lr,
        optim.weight_decay,
        (optim.beta1, optim.beta2),
        optim.eps,
        implementation="fused",
    )
    wrapped = compile_model(model, "inductor") if compile_model_ else model
    stepper = Stepper(
        wrapped,
        raw=model,
        optimizer=optimizer,
        optim=optim,
        precision=PrecisionSection(precision="bf16"),
        device=device,
        allow_cpu_autocast=True,
    )
    return model, stepper


def bench_gpu_step(
    name: str,
    batch: int,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    compile_model_: bool = True,
    grad_checkpointing: bool = False,
    peak: float | None = None,
) -> GpuResult:
    """bf16 training steps of ``name`` at per-device ``batch``; also runs on CPU (tests)."""
    model, stepper = build_gpu_stepper(
        name, device, compile_model_=compile_model_, grad_checkpointing=grad_checkpointing
    )
    images, tokens = make_inputs(model, batch, torch.Generator().manual_seed(0))
    images, tokens = images.to(device), tokens.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        stepper.step(images, tokens, 5e-4)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    med = statistics.median(times)
    pairs = batch / (med / 1e3)
    flops = train_flops_per_pair(model.config)
    del model, stepper
    return GpuResult(
        model=name,
        batch=batch,
        precision="bf16",
        compiled=compile_model_,
        grad_checkpointing=grad_checkpointing,
        pairs_per_s=pairs,
        median_step_ms=med,
        peak_memory_gib=peak_mem,
        train_flops_per_pair=flops,
        achieved_tflops=pairs * flops / 1e12,
        mfu=None if peak is None else pairs * flops / peak,
        step_ms=[round(t, 3) for t in times],
    )


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, multiple: int = 32) -> int:
    """Largest batch b <= ``limit`` (a multiple of ``multiple``) with ``fits(b)``; 0 if none.

    Doubles from ``start`` until a batch does not fit (or ``limit`` is passed), then bisects
    between the last batch that fitted and the first that did not. ``fits`` must be monotone.
    """
    good, bad, b = 0, limit + multiple, start
    while b <= limit:
        if not fits(b):
            bad = b
            break
        good, b = b, b * 2
    while bad - good > multiple:
        mid = max((good + bad) // 2 // multiple * multiple, good + multiple)
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def _fits_on_gpu(name: str, device: torch.device) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        try:
            bench_gpu_step(
                name,
                batch,
                device,
                steps=1,
                warmup=1,
                compile_model_=False,
                grad_checkpointing=True,
            )
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        except RuntimeError as exc:  # cuBLAS/cuDNN workspace allocations fail this way
            if "out of memory" in str(exc).lower() or "ALLOC_FAILED" in str(exc):
                return False
            raise
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    return fits


def run_gpu(args: argparse.Namespace) -> list[GpuResult]:
    """The GPU table: ViT-B-32 and RN50 at 256 and 512, ViT-L-14 at its largest batch."""
    if not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device (none visible)")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    print(f"GPU {name}: peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    results: list[GpuResult] = []
    for model in args.gpu_models:
        for batch in args.gpu_batches:
            r = bench_gpu_step(
                model,
                batch,
                device,
                steps=args.gpu_steps,
                warmup=args.gpu_warmup,
                compile_model_=not args.no_compile,
                peak=peak,
            )
            results.append(r)
            print(f"  {_gpu_line(r)}", flush=True)
            torch._dynamo.reset()  # drop the compiled graphs of this model and batch
            gc.collect()
            torch.cuda.empty_cache()
    if args.large_model:
        best = largest_fitting(_fits_on_gpu(args.large_model, device), 64, args.large_limit)
        print(f"  {args.large_model}: largest batch with grad checkpointing = {best}", flush=True)
        if best:
            r = bench_gpu_step(
                args.large_model,
                best,
                device,
                steps=args.gpu_steps,
                warmup=args.gpu_warmup,
                compile_model_=False,
                grad_checkpointing=True,
                peak=peak,
            )
            results.append(r)
            print(f"  {_gpu_line(r)}", flush=True)
    return results


def _gpu_line(r: GpuResult) -> str:
    mem = "n/a" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f} GiB"
    mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
    return (
        f"{r.model} batch {r.batch}: {r.pairs_per_s:.0f} pairs/s, {r.achieved_tflops:.1f} "
        f"TFLOP/s, MFU {mfu}, peak {mem}"
    )


def format_gpu_table(results: Sequence[GpuResult]) -> str:
    """Markdown table of the GPU mode."""
    lines = [
        "| model | batch | compile | grad ckpt | pairs/s | GFLOPs/pair (train) | TFLOP/s "
        "| MFU | peak memory |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mem = "n/a" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f} GiB"
        mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        lines.append(
            f"| {r.model} | {r.batch} | {r.compiled} | {r.grad_checkpointing} "
            f"| {r.pairs_per_s:.0f} | {r.train_flops_per_pair / 1e9:.1f} "
            f"| {r.achieved_tflops:.1f} | {mfu} | {mem} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.speed",
        description="Training throughput per optimisation (CPU), bf16 MFU (GPU), data pairs/s.",
    )
    p.add_argument("--mode", nargs="+", choices=MODES, default=["cpu"])
    p.add_argument("--models", nargs="+", default=list(CPU_PLANS), metavar="NAME")
    p.add_argument(
        "--compile-models",
        nargs="*",
        default=["tiny-vit"],
        metavar="NAME",
        help="models that get the compile variant (inductor compiles for minutes on a small "
        "CPU; default: tiny-vit; give no names to skip compile)",
    )
    p.add_argument("--batch", type=int, help="CPU: pairs per step (default: per model)")
    p.add_argument("--steps", type=int, help="CPU: timed steps per variant (default: per model)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: a tiny-recipe worker's infra.torch_threads; "
        "on a shared 2-core VM two OpenMP threads make small ops 10-30x slower whenever "
        "another process holds a core)",
    )
    p.add_argument("--gpu-models", nargs="+", default=list(GPU_MODELS), metavar="NAME")
    p.add_argument("--gpu-batches", nargs="+", type=int, default=list(GPU_BATCHES))
    p.add_argument("--gpu-steps", type=int, default=10)
    p.add_argument("--gpu-warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="GPU: eager, no torch.compile")
    p.add_argument("--large-model", default=LARGE_MODEL, help="GPU: '' skips the batch search")
    p.add_argument("--large-limit", type=int, default=4096, help="GPU: largest batch tried")
    p.add_argument("--peak-tflops", type=float, help="GPU: peak dense bf16 TFLOP/s override")
    p.add_argument(
        "--shards",
        type=Path,
        default=Path("/tmp/bench-shards-8k"),
        help="data: ingest output (the synthetic corpus of bench.train_ray is ingested here "
        "when there is no manifest)",
    )
    p.add_argument("--data-cpus", type=int, default=2, help="data: Ray CPUs (= cores used)")
    p.add_argument("--data-rows", type=int, default=2048, help="data: rows timed per size")
    p.add_argument("--data-sizes", nargs="+", type=int, default=[64, 224])
    p.add_argument(
        "--loop-steps",
        type=int,
        default=24,
        help="data: tiny-recipe steps per prefetch-0/4 loop run (0 skips the comparison)",
    )
    p.add_argument(
        "--open-clip-models",
        nargs="+",
        default=["tiny-vit", "tiny-rn", "ViT-B-32", "RN50"],
        metavar="NAME",
        help="open-clip: models compared with open_clip (bench.vs_open_clip)",
    )
    p.add_argument("--gpu-pairs-per-s", type=float, help="data: GPU figure for cores/GPU")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    check_args(p, args, models=[*args.models, *args.compile_models, *args.open_clip_models])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen modes, print their tables, optionally write JSON."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info()
    load = load_average()
    print(machine_line(info, load), flush=True)
    started = time.perf_counter()
    payload: dict[str, Any] = {"machine": info, "load_start": load}
    gpu: list[GpuResult] = []
    if "cpu" in args.mode:
        cpu: list[CpuModelResult] = []
        for name in args.models:
            plan = CPU_PLANS.get(name, CPU_PLANS["ViT-B-32"])
            plan = replace(
                plan,
                batch=args.batch or plan.batch,
                steps=args.steps or plan.steps,
            )
            cpu.append(bench_cpu_model(name, plan, compile_=name in args.compile_models))
            gc.collect()
        print()
        print(format_cpu_table(cpu))
        payload["cpu"] = [asdict(r) for r in cpu]
    if "gpu" in args.mode:
        gpu = run_gpu(args)
        print()
        print(format_gpu_table(gpu))
        payload["gpu"] = [asdict(r) for r in gpu]
    if "data" in args.mode:
        from bench.data_speed import bench_data, format_data_table, format_prefetch
        from bench.train_ray import DEFAULT_SOURCE, ensure_shards

        ensure_shards(args.shards, DEFAULT_SOURCE)  # ingests the synthetic corpus if missing

        data, prefetch = bench_data(
            args.shards, args.data_cpus, args.data_rows, args.data_sizes, args.loop_steps
        )
        print()
        gpu_rate = args.gpu_pairs_per_s or max((r.pairs_per_s for r in gpu), default=None)
        print(format_data_table(data, gpu_rate))
        print(format_prefetch(prefetch))
        payload["data"] = [asdict(r) for r in data]
        payload["loop_prefetch_pairs_per_s"] = prefetch
    if "open-clip" in args.mode:
        from bench.vs_open_clip import format_table, run_comparison

        try:
            pairs = run_comparison(args.open_clip_models, batch=args.batch, steps=args.steps)
        except FileNotFoundError as exc:  # no open_clip wheel
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print()
        print(format_table(pairs))
        payload["open_clip"] = [asdict(r) for r in pairs]
    elapsed = time.perf_counter() - started
    load_end = load_average()
    print(f"\ntotal {elapsed:.1f} s | load {' '.join(load_end)}")
    if args.json is not None:
        payload.update(elapsed_s=round(elapsed, 2), load_end=load_end)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
