"""CPU fp32 training-step throughput of clip_core models: fused SDPA vs naive attention.

One training step is forward + symmetric contrastive loss + backward + AdamW step + logit-scale
clamp, exactly as a training loop runs it. Each model is timed twice in the same process, on
the same weights and inputs: once as the library ships it (``F.scaled_dot_product_attention``)
and once with a naive baseline patched in by :func:`naive_attention` (explicit
``softmax(Q K^T / sqrt(d)) V`` with an additive causal mask tensor for the text tower). Steps
of the two variants are interleaved (A B A B ...) and each variant's throughput is taken from
the median step time, so the ratio stays meaningful on a noisy, shared machine even when the
absolute numbers do not.

Only ``SelfAttention`` (every transformer block of the ViT image tower and of the text tower)
is swapped; the ResNet tower's ``AttentionPool2d`` keeps SDPA in both variants.

Run::

    python -m bench.train_step [--models tiny-vit tiny-rn ViT-B-32] [--batch N] [--steps N]
        [--warmup N] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import check_args, machine_info, machine_line
from clip_core.loss import ClipLoss
from clip_core.model import CLIP, count_parameters
from clip_core.registry import create_model
from clip_core.transformer import SelfAttention


@dataclass(frozen=True)
class RunPlan:
    """How one model is benchmarked: pairs per step, warm-up and timed steps per variant."""

    batch: int
    steps: int
    warmup: int


DEFAULT_MODELS: tuple[str, ...] = ("tiny-vit", "tiny-rn", "ViT-B-32")
# Chosen so the default run finishes in well under ~3 minutes on 2 CPU cores.
DEFAULT_PLANS: dict[str, RunPlan] = {
    "tiny-vit": RunPlan(batch=64, steps=10, warmup=2),
    "tiny-rn": RunPlan(batch=64, steps=10, warmup=2),
    "ViT-B-32": RunPlan(batch=8, steps=5, warmup=1),
}
FALLBACK_PLAN = RunPlan(batch=8, steps=5, warmup=1)
EQUIVALENCE_ATOL = 1e-4
_MASKS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


@dataclass
class ModelResult:
    """Measured throughput of one model, both attention variants."""

    model: str
    params: int
    batch: int
    steps: int
    warmup: int
    pairs_per_s_sdpa: float
    pairs_per_s_naive: float
    speedup: float
    median_step_ms_sdpa: float
    median_step_ms_naive: float
    max_feature_diff: float
    paired_speedup_median: float
    paired_speedup_min: float
    paired_speedup_max: float
    step_ms_sdpa: list[float] = field(default_factory=list)
    step_ms_naive: list[float] = field(default_factory=list)


def _causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive [L, L] mask, -inf above the diagonal; cached like OpenAI's ``attn_mask``."""
    key = (length, device, dtype)
    if key not in _MASKS:
        mask = torch.full((length, length), float("-inf"), device=device, dtype=dtype)
        _MASKS[key] = mask.triu_(1)
    return _MASKS[key]


def _naive_self_attention(
    self: SelfAttention, x: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """``SelfAttention.forward`` with attention written out instead of fused SDPA."""
    B, L, D = x.shape
    head_dim = D // self.heads
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
    qkv = qkv.view(B, L, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, H, L, hd]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # [B, H, L, L]
    if causal:
        scores = scores + _causal_mask(L, x.device, x.dtype)
    y = scores.softmax(dim=-1) @ v  # [B, H, L, hd]
    y = y.transpose(1, 2).reshape(B, L, D)  # [B, L, D]
    return self.out_proj(y)


@contextmanager
def naive_attention() -> Iterator[None]:
    """Within the block, every ``SelfAttention`` computes attention naively (the baseline)."""
    original = SelfAttention.forward
    SelfAttention.forward = _naive_self_attention  # type: ignore[method-assign]
    try:
        yield
    finally:
        SelfAttention.forward = original  # type: ignore[method-assign]


def make_inputs(model: CLIP, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random images [B, 3, R, R] and token ids [B, L] with EOS (highest id) at a random spot.

    Tokens after the EOS are 0 (padding), as the tokenizer produces them.
    """
    cfg = model.config.text
    size, length, vocab = model.image_size, cfg.context_length, cfg.vocab_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    tokens = torch.randint(1, vocab - 1, (batch, length), generator=generator)
    eos = torch.randint(1, length, (batch,), generator=generator)  # [B]
    positions = torch.arange(length).expand(batch, length)  # [B, L]
    tokens = tokens.masked_fill(positions > eos[:, None], 0)
    tokens[torch.arange(batch), eos] = vocab - 1
    return images, tokens


def train_step(
    model: CLIP,
    optimizer: torch.optim.Optimizer,
    loss_fn: ClipLoss,
    images: torch.Tensor,
    tokens: torch.Tensor,
) -> float:
    """One full training step; returns its wall time in milliseconds."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    out = model(images, tokens)
    loss = loss_fn(out.image_features, out.text_features, out.logit_scale)
    loss.backward()
    optimizer.step()
    model.clamp_logit_scale()
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def feature_difference(model: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> float:
    """Largest absolute difference of the normalised features between the two variants."""
    fused = model(images, tokens)
    with naive_attention():
        naive = model(images, tokens)
    return max(
        (fused.image_features - naive.image_features).abs().max().item(),
        (fused.text_features - naive.text_features).abs().max().item(),
    )


def bench_model(name: str, plan: RunPlan, seed: int) -> ModelResult:
    """Benchmark one model: equivalence check, then interleaved naive/SDPA training steps."""
    torch.manual_seed(seed)
    model = create_model(name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    loss_fn = ClipLoss()
    images, tokens = make_inputs(model, plan.batch, torch.Generator().manual_seed(seed))
    diff = feature_difference(model, images, tokens)
    if not diff <= EQUIVALENCE_ATOL:
        raise RuntimeError(f"{name}: naive and SDPA attention disagree (max diff {diff:.2e})")
    times: dict[str, list[float]] = {"naive": [], "sdpa": []}
    for i in range(plan.warmup + plan.steps):
        with naive_attention():
            naive_ms = train_step(model, optimizer, loss_fn, images, tokens)
        sdpa_ms = train_step(model, optimizer, loss_fn, images, tokens)
        if i >= plan.warmup:
            times["naive"].append(naive_ms)
            times["sdpa"].append(sdpa_ms)
    med_naive, med_sdpa = statistics.median(times["naive"]), statistics.median(times["sdpa"])
    paired = [n / s for n, s in zip(times["naive"], times["sdpa"], strict=True)]
    return ModelResult(
        model=name,
        params=count_parameters(model),
        batch=plan.batch,
        steps=plan.steps,
        warmup=plan.warmup,
        pairs_per_s_sdpa=plan.batch / (med_sdpa / 1e3),
        pairs_per_s_naive=plan.batch / (med_naive / 1e3),
        speedup=med_naive / med_sdpa,
        median_step_ms_sdpa=med_sdpa,
        median_step_ms_naive=med_naive,
        max_feature_diff=diff,
        paired_speedup_median=statistics.median(paired),
        paired_speedup_min=min(paired),
        paired_speedup_max=max(paired),
        step_ms_sdpa=[round(t, 3) for t in times["sdpa"]],
        step_ms_naive=[round(t, 3) for t in times["naive"]],
    )


def _rate(pairs_per_s: float) -> str:
    """Throughput with about three significant digits, never in exponent notation."""
    return f"{pairs_per_s:.{2 if pairs_per_s < 10 else 1 if pairs_per_s < 100 else 0}f}"


def format_table(results: Sequence[ModelResult]) -> str:
    """Markdown table of the results."""
    lines = [
        "| model | params | batch | pairs/s (sdpa) | pairs/s (naive) | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.params / 1e6:.2f}M | {r.batch} | {_rate(r.pairs_per_s_sdpa)} "
            f"| {_rate(r.pairs_per_s_naive)} | {r.speedup:.2f}x |"
        )
    return "\n".join(lines)


def resolve_plan(name: str, args: argparse.Namespace) -> RunPlan:
    """The model's default plan with any command-line overrides applied."""
    base = DEFAULT_PLANS.get(name, FALLBACK_PLAN)
    return RunPlan(
        batch=args.batch if args.batch is not None else base.batch,
        steps=args.steps if args.steps is not None else base.steps,
        warmup=args.warmup if args.warmup is not None else base.warmup,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.train_step",
        description="CPU fp32 CLIP training-step throughput: fused SDPA vs naive attention.",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME")
    p.add_argument("--batch", type=int, help="pairs per step (default: per model, 64 or 8)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default: per model)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default: per model)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    check_args(p, args, models=args.models)
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be non-negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and optionally write JSON."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(machine_line(info), flush=True)
    started = time.perf_counter()
    results: list[ModelResult] = []
    for name in args.models:
        plan = resolve_plan(name, args)
        t0 = time.perf_counter()
        results.append(bench_model(name, plan, args.seed))
        r = results[-1]
        print(
            f"  {name}: sdpa {r.median_step_ms_sdpa:.1f} ms/step, naive "
            f"{r.median_step_ms_naive:.1f} ms/step, per-pair speed-up median "
            f"{r.paired_speedup_median:.2f}x (range {r.paired_speedup_min:.2f}-"
            f"{r.paired_speedup_max:.2f}), max feature diff {r.max_feature_diff:.1e} "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        gc.collect()
    elapsed = time.perf_counter() - started
    print()
    print(format_table(results))
    print(f"\ntotal {elapsed:.1f} s")
    if args.json is not None:
        payload: dict[str, Any] = {
            "machine": info,
            "elapsed_s": round(elapsed, 2),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
