"""CPU mode of ``bench.speed``: pairs/s of one training step, optimisation by optimisation.

See ``bench/speed.py`` for what each variant is. All variants of one model share one set of
weights (a second copy only for the channels-last layout), so a 150M-parameter model fits in
a few GB; each AdamW implementation has its own optimiser state.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.flops import train_flops_per_pair
from bench.loss_memory import simulated_rank
from bench.train_step import _naive_self_attention, make_inputs
from clip_core import loss as loss_mod
from clip_core.model import CLIP, ClipOutput, count_parameters
from clip_core.registry import create_model
from clip_core.resnet import ModifiedResNet
from clip_core.transformer import SelfAttention
from clip_train.optim import build_optimizer
from clip_train.step import compile_model

LR = 1e-3
WEIGHT_DECAY = 0.2
LOSS_RTOL = 1e-4  # |loss - baseline| / |baseline|
GRAD_RTOL = 1e-3  # max |grad - baseline| / max |baseline grad|
UPDATE_RTOL = 1e-2  # ||update - baseline update|| / ||baseline update|| (L2 over all weights)


@dataclass(frozen=True)
class CpuPlan:
    """Pairs per step, timed steps and untimed steps per variant."""

    batch: int
    steps: int
    warmup: int


CPU_PLANS: dict[str, CpuPlan] = {
    "tiny-vit": CpuPlan(batch=64, steps=10, warmup=1),  # the tiny recipe's per-worker batch
    "tiny-rn": CpuPlan(batch=64, steps=10, warmup=1),
    "ViT-B-32": CpuPlan(batch=8, steps=4, warmup=1),
}


@dataclass(frozen=True)
class Variant:
    """One combination of optimisations."""

    name: str
    attention: str = "naive"  # naive | sdpa
    adamw: str = "for-loop"  # for-loop | foreach | fused
    channels_last: bool = False
    compiled: bool = False
    loss: str = "full"  # full | local


@dataclass
class VariantResult:
    """Check and timing of one variant."""

    name: str
    pairs_per_s: float
    median_step_ms: float
    speedup: float  # baseline median step / this median step
    loss_rel_diff: float
    grad_rel_diff: float
    update_rel_diff: float
    step_ms: list[float] = field(default_factory=list)


@dataclass
class CpuModelResult:
    """All variants of one model."""

    model: str
    params: int
    batch: int
    steps: int
    warmup: int
    train_gflops_per_pair: float
    variants: list[VariantResult]


class NaiveSelfAttention(SelfAttention):
    """``SelfAttention`` with attention written out (the baseline of ``bench.train_step``)."""

    forward = _naive_self_attention


def set_attention(model: nn.Module, kind: str) -> None:
    """Switch every self-attention block of ``model`` to naive or fused (SDPA) attention.

    The class of each block is swapped (weights untouched), so ``torch.compile`` guards on it
    and keeps one graph per kind.
    """
    cls = NaiveSelfAttention if kind == "naive" else SelfAttention
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.__class__ = cls


def fused_adamw_available() -> bool:
    """Whether this torch build has a fused AdamW kernel for CPU tensors."""
    try:
        p = nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], fused=True)
        p.grad = torch.ones(2)
        opt.step()
    except (RuntimeError, ValueError):
        return False
    return True


def variants_for(model: CLIP, compile_: bool, fused: bool) -> list[Variant]:
    """The baseline, each optimisation alone, and all together."""
    resnet = isinstance(model.visual, ModifiedResNet)
    best_adamw = "fused" if fused else "foreach"
    out = [
        Variant("baseline"),
        Variant("sdpa", attention="sdpa"),
        Variant("foreach", adamw="foreach"),
    ]
    if fused:
        out.append(Variant("fused-adamw", adamw="fused"))
    if resnet:
        out.append(Variant("channels-last", channels_last=True))
    if compile_:
        out.append(Variant("compile", compiled=True))
    out.append(Variant("local-rows", loss="local"))
    out.append(
        Variant(
            "all",
            attention="sdpa",
            adamw=best_adamw,
            channels_last=resnet,
            compiled=compile_,
            loss="local",
        )
    )
    return out


class Bench:
    """Shared weights, inputs and the simulated other rank's features for one model."""

    def __init__(self, name: str, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.models: dict[bool, CLIP] = {False: create_model(name)}
        self.initial = {k: v.clone() for k, v in self.models[False].state_dict().items()}
        g = torch.Generator().manual_seed(seed)
        self.images, self.tokens = make_inputs(self.models[False], batch, g)
        dim = self.models[False].config.embed_dim
        other = [F.normalize(torch.randn(batch, dim, generator=g), dim=-1) for _ in range(2)]
        self.others = torch.stack(other).unsqueeze(0)  # rank 0's [1, 2, n, D]: images, texts
        self.optimizers: dict[tuple[bool, str], torch.optim.Optimizer] = {}
        self.compiled: dict[bool, nn.Module] = {}

    def model(self, v: Variant) -> CLIP:
        """The weights ``v`` trains (a channels-last copy for the ResNet layout variant)."""
        if v.channels_last not in self.models:
            copy = create_model(self.models[False].config.name)
            copy.load_state_dict(self.initial)
            assert isinstance(copy.visual, ModifiedResNet)
            copy.visual.set_channels_last(True)
            self.models[True] = copy
        return self.models[v.channels_last]

    def optimizer(self, v: Variant) -> torch.optim.Optimizer:
        """The AdamW of ``v``'s implementation over ``v``'s weights."""
        key = (v.channels_last, v.adamw)
        if key not in self.optimizers:
            self.optimizers[key] = build_optimizer(
                self.model(v), LR, WEIGHT_DECAY, implementation=v.adamw
            )
        return self.optimizers[key]

    def module(self, v: Variant) -> nn.Module:
        """What is called forward: the model, or its ``torch.compile`` wrapper (inductor)."""
        model = self.model(v)
        set_attention(model, v.attention)
        if not v.compiled:
            return model
        if v.channels_last not in self.compiled:
            self.compiled[v.channels_last] = compile_model(model, "inductor")
        return self.compiled[v.channels_last]

    def inputs(self, v: Variant) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (in ``v``'s memory layout) and tokens."""
        fmt = torch.channels_last if v.channels_last else torch.contiguous_format
        return self.images.contiguous(memory_format=fmt), self.tokens

    def loss(self, v: Variant, out: ClipOutput, both_ranks: bool = False) -> torch.Tensor:
        """This rank's (rank 1 of 2) loss; ``both_ranks``: the mean of both ranks' losses."""
        img, txt, scale = out.image_features, out.text_features, out.logit_scale  # [n, D]
        if v.loss == "full":
            all_img = torch.cat([self.others[0, 0], img])  # gathered [2n, D]
            all_txt = torch.cat([self.others[0, 1], txt])
            return loss_mod.contrastive_loss(all_img, all_txt, scale)
        with simulated_rank(1, 2, self.others):
            mine = loss_mod.local_rows_loss(img, txt, scale)
        if not both_ranks:
            return mine
        own = torch.stack([img, txt]).unsqueeze(0)  # rank 0 gathers this rank's block [1, 2, n, D]
        with simulated_rank(0, 2, own):
            theirs = loss_mod.local_rows_loss(self.others[0, 0], self.others[0, 1], scale)
        return (mine + theirs) / 2

    def step(self, v: Variant, both_ranks: bool = False) -> tuple[float, torch.Tensor]:
        """One training step of ``v``: (milliseconds, loss)."""
        module, optimizer = self.module(v), self.optimizer(v)
        images, tokens = self.inputs(v)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out: ClipOutput = module(images, tokens)
        loss = self.loss(v, out, both_ranks)
        loss.backward()
        optimizer.step()
        self.model(v).clamp_logit_scale()
        return (time.perf_counter() - start) * 1e3, loss.detach()

    def check_step(
        self, v: Variant
    ) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """From the initial weights and a fresh optimiser: (loss, gradients, updates)."""
        model, optimizer = self.model(v), self.optimizer(v)
        model.load_state_dict(self.initial)
        optimizer.state.clear()
        _, loss = self.step(v, both_ranks=True)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        after = model.state_dict()
        updates = {n: after[n] - self.initial[n] for n, _ in model.named_parameters()}
        return float(loss), grads, updates


def _max_abs(tensors: dict[str, torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in tensors.values())


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise RuntimeError(f"gradients of different parameters: {sorted(a.keys() ^ b.keys())}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors together (one vector of every weight)."""
    diff = sum(float((a[k] - b[k]).double().square().sum()) for k in b)
    norm = sum(float(b[k].double().square().sum()) for k in b)
    return (diff / norm) ** 0.5


def check_variants(bench: Bench, variants: list[Variant]) -> dict[str, tuple[float, float, float]]:
    """(loss rel diff, grad rel diff, update rel diff) of each variant vs the baseline.

    Loss: |l - l0| / |l0|; gradients: max |g - g0| / max |g0|; update (weights after one
    AdamW step minus before): relative L2 norm of the difference. Adam divides each gradient
    by its running RMS, so gradients near zero (|g| ~ eps) turn rounding noise into updates of
    up to a few % of the learning rate on single weights: a norm over all weights is the
    stable measure, and a wrong loss, gradient or optimiser moves it by O(1).

    Raises ``RuntimeError`` when a variant is outside the tolerances.
    """
    base_loss, base_grads, base_updates = bench.check_step(variants[0])
    grad_scale = _max_abs(base_grads)
    out: dict[str, tuple[float, float, float]] = {}
    for v in variants:
        loss, grads, updates = bench.check_step(v)
        diffs = (
            abs(loss - base_loss) / abs(base_loss),
            _max_diff(grads, base_grads) / grad_scale,
            _rel_l2(updates, base_updates),
        )
        if diffs[0] > LOSS_RTOL or diffs[1] > GRAD_RTOL or diffs[2] > UPDATE_RTOL:
            raise RuntimeError(
                f"{v.name} differs from the baseline: loss {diffs[0]:.1e} (tol {LOSS_RTOL}), "
                f"grad {diffs[1]:.1e} (tol {GRAD_RTOL}), update {diffs[2]:.1e} "
                f"(tol {UPDATE_RTOL})"
            )
        out[v.name] = diffs
    return out


def bench_cpu_model(name: str, plan: CpuPlan, compile_: bool, seed: int = 0) -> CpuModelResult:
    """Check every variant against the baseline, then time them interleaved."""
    t0 = time.perf_counter()
    bench = Bench(name, plan.batch, seed)
    variants = variants_for(bench.models[False], compile_, fused_adamw_available())
    diffs = check_variants(bench, variants)
    print(
        f"  {name}: {len(variants)} variants checked ({time.perf_counter() - t0:.0f} s)", flush=True
    )
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(plan.warmup + plan.steps):
        for v in variants:
            ms, _ = bench.step(v)
            if i >= plan.warmup:
                times[v.name].append(ms)
    base = statistics.median(times["baseline"])
    results = []
    for v in variants:
        med = statistics.median(times[v.name])
        results.append(
            VariantResult(
                name=v.name,
                pairs_per_s=plan.batch / (med / 1e3),
                median_step_ms=med,
                speedup=base / med,
                loss_rel_diff=diffs[v.name][0],
                grad_rel_diff=diffs[v.name][1],
                update_rel_diff=diffs[v.name][2],
                step_ms=[round(t, 3) for t in times[v.name]],
            )
        )
    print(f"  {name}: timed ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    return CpuModelResult(
        model=name,
        params=count_parameters(bench.models[False]),
        batch=plan.batch,
        steps=plan.steps,
        warmup=plan.warmup,
        train_gflops_per_pair=train_flops_per_pair(bench.models[False].config) / 1e9,
        variants=results,
    )


def format_cpu_table(results: list[CpuModelResult]) -> str:
    """Markdown table: one row per model and variant."""
    lines = [
        "| model | batch | variant | pairs/s | speed-up vs baseline | GFLOP/s "
        "| check: loss / grad / update |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        for v in r.variants:
            lines.append(
                f"| {r.model} | {r.batch} | {v.name} | {v.pairs_per_s:.1f} | {v.speedup:.2f}x "
                f"| {v.pairs_per_s * r.train_gflops_per_pair:.1f} "
                f"| {v.loss_rel_diff:.0e} / {v.grad_rel_diff:.0e} / {v.update_rel_diff:.0e} |"
            )
    return "\n".join(lines)
