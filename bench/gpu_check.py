"""The GPU check of issue 21 (point 6): what one H100/H200 says about clipops, in one JSON.

``bench/gpu_check.sh`` runs the CUDA tests (pytest, ``tests/test_train_cuda.py`` and the
device-check tests) and then this module, which records:

- the machine: device name, compute capability, ``torch.cuda.get_arch_list()``, torch, CUDA
  and cuDNN versions, and whether ``clip_train.device_check.check_device`` accepts the GPU;
- the CUDA tests' summary, read from pytest's JUnit XML (``--tests-junit``);
- the measured bf16 matmul peak: the best of ``--matmul-reps`` timed ``n x n @ n x n``
  products (``n`` = 8192: 2 n^3 = 1.1 TFLOP each), ``torch.cuda.synchronize`` around each;
- ViT-B/32 training throughput at per-GPU batch 256 and 512, eager and ``torch.compile``
  (inductor): full optimiser steps through the product's ``Stepper`` (bf16 autocast, fused
  AdamW, local-rows loss, gradient checkpointing off), timed after warm-up steps with
  ``torch.cuda.synchronize`` before and after each step (``bench.speed.bench_gpu_step``, the
  same code as ``python -m bench.speed --mode gpu``);
- MFU = pairs/s x training FLOPs per pair / measured matmul peak, where training FLOPs per
  pair = 3 x the analytic forward FLOPs of both towers from the model config
  (``bench.flops.train_flops_per_pair``); also against the datasheet peak when the device
  name is known (989 TFLOP/s dense bf16 for H100 SXM and H200).

The JSON is rewritten after every measurement, so a run stopped by the time budget (SIGTERM
from ``timeout``) still leaves what it measured, with ``"complete": false``.

Without CUDA every GPU part is skipped with one line each ("gpu_check: no CUDA device
(torch.cuda.is_available() is False): skipping ...") and the JSON says ``"cuda": false``;
the exit status is 0. ``--cpu-smoke`` runs the same measurement code on the CPU with
tiny-vit, a small matmul and 2 timed steps, eager only by default (inductor takes minutes to
compile on a small CPU), so the code path is tested on any machine.

    .venv/bin/python -m bench.gpu_check [--out PATH] [--batches 256 512] [--steps 10]
        [--warmup 3] [--compile off on] [--cpu-smoke] [--tests-junit XML --tests-rc N]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from bench.common import check_args
from bench.flops import forward_flops, mfu, peak_flops, train_flops_per_pair
from clip_core.registry import get_model_config, parameter_count

SCHEMA_VERSION = 1
SKIP_PREFIX = "gpu_check: no CUDA device (torch.cuda.is_available() is False): skipping"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check.json"
GPU_MODEL, SMOKE_MODEL = "ViT-B-32", "tiny-vit"
GPU_BATCHES, SMOKE_BATCHES = (256, 512), (4, 8)
GPU_STEPS, SMOKE_STEPS = 10, 2
GPU_WARMUP, SMOKE_WARMUP = 3, 1
GPU_MATMUL_N, SMOKE_MATMUL_N = 8192, 256
GPU_MATMUL_REPS, SMOKE_MATMUL_REPS = 10, 3
COMPILE_MODES = ("off", "on")


class BudgetExceeded(BaseException):
    """SIGTERM arrived (``timeout`` in bench/gpu_check.sh): stop and write what was measured.

    A ``BaseException``, like ``KeyboardInterrupt``, so that the ``except Exception`` handlers
    inside torch.compile do not turn it into a compile failure and carry on."""


@dataclass(frozen=True)
class MatmulPeak:
    """The measured dense matmul throughput of one device and dtype."""

    device: str
    dtype: str
    n: int
    reps: int
    best_flops_per_s: float  # the peak used for MFU
    median_flops_per_s: float
    best_ms: float


@dataclass
class RunRecord:
    """One (batch, compile) training measurement, or the error that stopped it."""

    model: str
    batch: int
    compile: bool
    steps: int
    warmup: int
    pairs_per_s: float | None = None
    step_ms: float | None = None  # median of the timed steps
    achieved_tflops: float | None = None
    mfu: float | None = None  # against the measured matmul peak
    mfu_vs_datasheet: float | None = None
    peak_memory_gib: float | None = None
    step_ms_all: list[float] = field(default_factory=list)
    error: str | None = None


def matmul_flops(n: int) -> int:
    """FLOPs of one ``n x n @ n x n`` product (2 per multiply-add)."""
    return 2 * n**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    device: torch.device,
    n: int,
    reps: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    warmup: int = 2,
    timer: Callable[[], float] = time.perf_counter,
) -> MatmulPeak:
    """Time ``reps`` products of two random ``n x n`` matrices (after ``warmup`` untimed ones),
    each between synchronisations; the best rate is the device's practical peak."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    times: list[float] = []
    for _ in range(reps):
        _sync(device)
        start = timer()
        torch.matmul(a, b, out=out)
        _sync(device)
        times.append(timer() - start)
    flops = matmul_flops(n)
    best = min(times)
    return MatmulPeak(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        n=n,
        reps=reps,
        best_flops_per_s=flops / best,
        median_flops_per_s=flops / statistics.median(times),
        best_ms=best * 1e3,
    )


def pairs_per_second(batch: int, step_ms: float) -> float:
    """Throughput of one step of ``batch`` pairs taking ``step_ms`` milliseconds."""
    return batch / (step_ms / 1e3)


def step_mfu(batch: int, step_ms: float, flops_per_pair: int, peak: float) -> float:
    """MFU of a step: ``batch`` pairs in ``step_ms`` at ``flops_per_pair`` against ``peak``."""
    return mfu(pairs_per_second(batch, step_ms), flops_per_pair, peak)


def measure_run(
    model: str,
    batch: int,
    compiled: bool,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    peak: float | None,
    datasheet: float | None,
) -> RunRecord:
    """bf16 training steps of ``model`` at ``batch`` (``bench.speed.bench_gpu_step``); an
    out-of-memory or compile failure is recorded, not raised."""
    from bench.speed import bench_gpu_step

    record = RunRecord(model=model, batch=batch, compile=compiled, steps=steps, warmup=warmup)
    try:
        r = bench_gpu_step(
            model,
            batch,
            device,
            steps=steps,
            warmup=warmup,
            compile_model_=compiled,
            grad_checkpointing=False,
        )
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        record.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        return record
    finally:
        if compiled:
            torch._dynamo.reset()  # drop this batch's graphs before the next run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record.pairs_per_s = r.pairs_per_s
    record.step_ms = r.median_step_ms
    record.achieved_tflops = r.achieved_tflops
    record.peak_memory_gib = r.peak_memory_gib
    record.step_ms_all = r.step_ms
    flops = r.train_flops_per_pair
    if peak:
        record.mfu = step_mfu(batch, r.median_step_ms, flops, peak)
    if datasheet:
        record.mfu_vs_datasheet = step_mfu(batch, r.median_step_ms, flops, datasheet)
    return record


def summarise_junit(path: Path, rc: int | None = None) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest ``--junitxml`` report."""
    if not path.is_file():
        return {"ran": True, "rc": rc, "error": f"no JUnit report at {path}"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    cases: list[dict[str, Any]] = []
    for suite in suites:
        for case in suite.iter("testcase"):
            outcome, message = "passed", None
            for kind in ("failure", "error", "skipped"):
                child = case.find(kind)
                if child is not None:
                    outcome, message = kind, child.get("message")
                    break
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            cases.append({"test": name, "outcome": outcome, "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("failure", "error", "skipped")}
    return {
        "ran": True,
        "rc": rc,
        "total": len(cases),
        "passed": sum(c["outcome"] == "passed" for c in cases),
        "failed": counts["failure"],
        "errors": counts["error"],
        "skipped": counts["skipped"],
        "seconds": round(sum(float(s.get("time", 0) or 0) for s in suites), 2),
        "cases": cases,
    }


def device_record(cuda: bool) -> dict[str, Any]:
    """The torch build and, with CUDA, the GPU and ``check_device``'s verdict on it."""
    record: dict[str, Any] = {
        "cuda": cuda,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "arch_list": torch.cuda.get_arch_list() if cuda else [],
        "device": "cpu",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "capability": None,
        "device_check": None,
    }
    if cuda:
        from clip_train.device_check import DeviceError, check_device, current_device_info

        info = current_device_info(0)
        record["device"] = info.name
        record["capability"] = list(info.capability)
        precision = "bf16" if info.capability >= (8, 0) else "fp16"
        try:
            check_device(info, precision)
            record["device_check"] = f"ok ({precision})"
        except DeviceError as exc:
            record["device_check"] = str(exc)
    return record


def output_path(arg: Path | None, env: Mapping[str, str]) -> Path:
    """``--out``, else ``$OUT/gpu_check.json`` when ``$OUT`` is set, else bench/results/."""
    if arg is not None:
        return arg
    if env.get("OUT"):
        return Path(env["OUT"]) / "gpu_check.json"
    return DEFAULT_OUT


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def _run_line(r: RunRecord) -> str:
    mode = "compile" if r.compile else "eager"
    if r.error is not None:
        return f"  {r.model} batch {r.batch} {mode}: FAILED {r.error}"
    mfu_text = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
    sheet = "" if r.mfu_vs_datasheet is None else f" ({100 * r.mfu_vs_datasheet:.1f}% of datasheet)"
    mem = "" if r.peak_memory_gib is None else f", peak {r.peak_memory_gib:.1f} GiB"
    return (
        f"  {r.model} batch {r.batch} {mode}: {r.pairs_per_s:.0f} pairs/s, "
        f"{r.step_ms:.1f} ms/step, MFU {mfu_text}{sheet}{mem}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults depend on ``--cpu-smoke``."""
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description="bf16 matmul peak, training pairs/s and MFU on one GPU; one JSON.",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="JSON path (default: $OUT/gpu_check.json, else bench/results/gpu_check.json)",
    )
    p.add_argument("--model", help=f"model config (default {GPU_MODEL}; smoke {SMOKE_MODEL})")
    p.add_argument("--batches", nargs="+", type=int, help="per-GPU batches (default 256 512)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; smoke 1)")
    p.add_argument(
        "--compile",
        nargs="+",
        choices=COMPILE_MODES,
        help="default: off on (smoke: off; inductor compiles for minutes on a small CPU)",
    )
    p.add_argument("--matmul-n", type=int, help="matmul size (default 8192; smoke 256)")
    p.add_argument("--matmul-reps", type=int, help="timed matmuls (default 10; smoke 3)")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="the measurement code on the CPU: tiny-vit, 2 steps, a small matmul",
    )
    p.add_argument("--tests-junit", type=Path, help="pytest --junitxml report of the CUDA tests")
    p.add_argument("--tests-rc", type=int, help="pytest's exit status (124: timed out)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.model = args.model or (SMOKE_MODEL if smoke else GPU_MODEL)
    args.batches = args.batches or list(SMOKE_BATCHES if smoke else GPU_BATCHES)
    args.steps = args.steps if args.steps is not None else (SMOKE_STEPS if smoke else GPU_STEPS)
    if args.warmup is None:
        args.warmup = SMOKE_WARMUP if smoke else GPU_WARMUP
    args.compile = args.compile or (["off"] if smoke else list(COMPILE_MODES))
    args.matmul_n = args.matmul_n or (SMOKE_MATMUL_N if smoke else GPU_MATMUL_N)
    args.matmul_reps = args.matmul_reps or (SMOKE_MATMUL_REPS if smoke else GPU_MATMUL_REPS)
    check_args(p, args, positive=("steps", "matmul_n", "matmul_reps"), models=[args.model])
    if args.warmup < 0:
        p.error("--warmup must be non-negative")
    if any(b < 1 for b in args.batches):
        p.error("--batches must be at least 1")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise BudgetExceeded(f"signal {signum}")


def _tests_section(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    if args.tests_junit is not None:
        return summarise_junit(args.tests_junit, args.tests_rc)
    if not cuda:
        return {"ran": False, "reason": "no CUDA device (torch.cuda.is_available() is False)"}
    return {"ran": False, "reason": "not run by this command (bench/gpu_check.sh runs them)"}


def _measure(
    args: argparse.Namespace, device: torch.device, payload: dict[str, Any], out: Path
) -> None:
    """The matmul peak, then every (compile, batch) run; the JSON is rewritten after each."""
    peak = measure_matmul_peak(device, args.matmul_n, args.matmul_reps)
    payload["peak"] = {**payload["peak"], **asdict(peak), "tflops": peak.best_flops_per_s / 1e12}
    print(
        f"gpu_check: {peak.dtype} matmul {peak.n}^3 on {peak.device}: "
        f"{peak.best_flops_per_s / 1e12:.1f} TFLOP/s (best of {peak.reps})",
        flush=True,
    )
    write_json(out, payload)
    datasheet = payload["peak"]["datasheet_flops_per_s"]
    for mode in args.compile:
        for batch in args.batches:
            record = measure_run(
                args.model,
                batch,
                mode == "on",
                device,
                steps=args.steps,
                warmup=args.warmup,
                peak=peak.best_flops_per_s,
                datasheet=datasheet,
            )
            payload["runs"].append(asdict(record))
            print(_run_line(record), flush=True)
            write_json(out, payload)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write the JSON; 0 unless a measurement failed or time ran out."""
    args = parse_args(argv)
    out = output_path(args.out, os.environ)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    machine = device_record(cuda)
    cfg = get_model_config(args.model)
    payload: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "complete": False,
        "cpu_smoke": args.cpu_smoke,
        **machine,
        "tests": _tests_section(args, cuda),
        "model": args.model,
        "parameters": parameter_count(cfg),
        "forward_flops_per_pair": forward_flops(cfg),
        "train_flops_per_pair": train_flops_per_pair(cfg),
        "settings": {
            "precision": "bf16",
            "adamw": "fused",
            "grad_checkpointing": False,
            "batches": args.batches,
            "compile": args.compile,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "peak": {"datasheet_flops_per_s": peak_flops(machine["device"]) if cuda else None},
        "runs": [],
        "skipped": [],
    }
    if not cuda:
        smoke = " (--cpu-smoke: measured on the CPU instead)" if args.cpu_smoke else ""
        for part in ("the bf16 matmul peak", f"{GPU_MODEL} training pairs/s and MFU"):
            line = f"{SKIP_PREFIX} {part}{smoke}"
            payload["skipped"].append(line)
            print(line, flush=True)
    if cuda and args.cpu_smoke:
        payload["skipped"].append("GPU measurements: --cpu-smoke measures on the CPU")
    if args.cpu_smoke and "on" not in args.compile:
        payload["skipped"].append("compile on: not requested for --cpu-smoke")
    device = torch.device("cuda" if cuda and not args.cpu_smoke else "cpu")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    rc = 0
    try:
        if cuda or args.cpu_smoke:
            _measure(args, device, payload, out)
        payload["complete"] = True
    except BudgetExceeded:
        print("gpu_check: stopped by the time budget; the JSON holds what was measured")
        payload["stopped"] = "time budget"
        rc = 3
    finally:
        signal.signal(signal.SIGTERM, previous)
        payload["elapsed_s"] = round(time.perf_counter() - started, 2)
        write_json(out, payload)
    failed = [r for r in payload["runs"] if r["error"] is not None]
    bad_mfu = [r for r in payload["runs"] if r["mfu"] is not None and not math.isfinite(r["mfu"])]
    refused = cuda and not str(machine["device_check"]).startswith("ok")
    print(f"gpu_check: wrote {out}", flush=True)
    return rc or (1 if failed or bad_mfu or refused else 0)


if __name__ == "__main__":
    sys.exit(main())
