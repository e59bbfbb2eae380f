"""clipops against open_clip: training throughput of the same model on the same machine (issue 10).

The reference is open_clip (``open_clip_torch``, the widely used open-source CLIP trainer), run
from its own wheel: its ``CLIP`` model (``quick_gelu=True``, OpenAI's architecture), its
``ClipLoss`` and the AdamW its trainer builds (``open_clip_train/main.py``: gains, biases and
the temperature without weight decay, torch's default implementation, which is the
for-loop on CPU tensors), and its training step (``open_clip_train/train.py``: forward,
``ClipLoss``, backward, ``optimizer.step()``, temperature clamped to ln 100). clipops is the
product's ``clip_train.step.Stepper`` (local-rows loss) on ``clip_core``'s model with the
fast settings: fused attention (SDPA, the library default), fused AdamW (foreach where the
torch build has no fused CPU kernel), channels-last convolutions for ResNet towers. fp32,
no ``torch.compile`` on either side (it would compile both for minutes on a small CPU),
the same batch, the same inputs, the same intra-op threads, one process.

Fairness, checked before any timing (a failed check raises):

- **same architecture**: open_clip's own model config from its wheel for the paper models
  (ViT-B-32, RN50), the clipops config translated for the tiny ones; the parameter counts
  are equal and clipops' weights load into open_clip's model with ``strict=True`` (both use
  OpenAI's parameter names and shapes);
- **same function**: with those weights, both models' image and text features agree
  (eval mode, max |diff| <= ``FEATURE_ATOL``);
- **same training step**: the first step of both, from the same weights and inputs, gives
  the same loss (relative ``LOSS_RTOL``), the same gradients (max |diff| <= ``GRAD_RTOL`` x
  max |gradient|) and the same parameter update (relative L2 norm of the difference over
  all weights <= ``UPDATE_RTOL``). The ViTs agree to ~1e-5. ResNets trained with BatchNorm
  on batch statistics are ill-conditioned in fp32 at OpenAI's initialisation: RN50's fp32
  gradients at batch 8 are only within 3e-3 (NCHW) and 8e-3 (channels-last) of the same
  model's fp64 gradients (measured), so channels-last clipops and NCHW open_clip differ by
  ~8e-3 in the gradient; Adam's first step, ~lr x sign(gradient), turns the sign flips of
  near-zero gradients into lr-sized update differences (~8e-3 relative, RN50). A wrong
  learning rate moves the update by O(1), a different activation the features
  (``tests/test_bench_speed.py``);
- **FLOPs**: the analytic forward FLOPs per pair of ``bench.flops`` and, for both models,
  ``torch.utils.flop_counter.FlopCounterMode`` counts of one forward on the meta device.
  ViT counts are equal. For ResNets clipops counts fewer: its attention pool queries only the
  pooled (mean) token, whose output is the only one kept, where OpenAI's and open_clip's
  compute the output of every spatial token and discard all but the first (same result;
  RN50: 17.55 vs 18.18 GFLOP per pair forward, 3.5%). The table states both counts.

Then both sides train on, steps interleaved (clipops, open_clip, clipops, ...), and pairs/s
= batch / median step time; the ratio is clipops / open_clip. Single process: the loss is
the whole batch's on both sides (clipops' local-rows loss equals the full matrix at world 1),
so the loss is not what differs here; ``bench/loss_memory.py`` measures it at scale.

open_clip is not a dependency of the project: the wheel is read in place (pure Python,
imported from the zip). Only ``open_clip.model`` and ``open_clip.loss`` are imported, not the
package's ``__init__`` (which pulls in tokenizers, transforms and the hub client); timm and
transformers are optional imports there. torchvision (not installed here) is imported by
``open_clip/utils.py`` for ``FrozenBatchNorm2d`` only, used to freeze BatchNorm for
fine-tuning: a stub stands in while the modules import, and is removed afterwards.

    .venv/bin/python -m bench.vs_open_clip [--models tiny-vit tiny-rn ViT-B-32 RN50]
        [--batch N] [--steps N] [--threads 1] [--wheel PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import statistics
import sys
import time
import types
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.common import check_args, load_average, machine_info, machine_line
from bench.cpu_speed import fused_adamw_available
from bench.flops import forward_flops
from bench.train_step import make_inputs
from clip_core.config import ModelConfig, ResNetConfig, ViTConfig
from clip_core.model import CLIP, count_parameters
from clip_core.registry import create_model, get_model_config
from clip_core.resnet import ModifiedResNet
from clip_train.config import OptimSection, PrecisionSection
from clip_train.optim import build_optimizer
from clip_train.step import Stepper

OPEN_CLIP_VERSION = "3.3.0"  # the version tests/conftest.py downloads
WHEEL_CACHE = Path.home() / ".cache" / "clipops-test" / "open_clip_wheel"  # shared with the tests
LR, WEIGHT_DECAY, BETAS, EPS = 5e-4, 0.2, (0.9, 0.98), 1e-6  # the paper's (both sides)
FEATURE_ATOL = 1e-4  # max |feature diff| (features are L2-normalised)
LOSS_RTOL = 1e-5
GRAD_RTOL = 2e-2  # max |grad diff| / max |grad|
UPDATE_RTOL = 5e-2  # ||update diff|| / ||update||
TORCHVISION_STUBS = ("torchvision", "torchvision.ops", "torchvision.ops.misc")


@dataclass(frozen=True)
class Plan:
    """Pairs per step, timed steps and untimed steps per side."""

    batch: int
    steps: int
    warmup: int


PLANS: dict[str, Plan] = {
    "tiny-vit": Plan(batch=64, steps=10, warmup=1),
    "tiny-rn": Plan(batch=64, steps=10, warmup=1),
    "ViT-B-32": Plan(batch=8, steps=4, warmup=1),
    "RN50": Plan(batch=8, steps=4, warmup=1),
}


@dataclass
class PairResult:
    """One model: fairness checks, then both sides' throughput."""

    model: str
    batch: int
    steps: int
    open_clip_config: str  # "open_clip" (its own model_configs JSON) or "translated"
    params_clipops: int
    params_open_clip: int
    forward_gflops_analytic: float
    forward_gflops_counted_clipops: float
    forward_gflops_counted_open_clip: float
    feature_max_diff: float
    loss_rel_diff: float
    grad_rel_diff: float
    update_rel_diff: float
    clipops_adamw: str
    open_clip_adamw: str
    clipops_pairs_per_s: float
    open_clip_pairs_per_s: float
    ratio: float  # clipops pairs/s / open_clip pairs/s
    losses_clipops: list[float] = field(default_factory=list)
    losses_open_clip: list[float] = field(default_factory=list)
    step_ms_clipops: list[float] = field(default_factory=list)
    step_ms_open_clip: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class OpenClip:
    """open_clip's model and loss modules, imported from the wheel."""

    wheel: Path
    model: types.ModuleType
    loss: types.ModuleType


def find_wheel(path: Path | None = None) -> Path:
    """The open_clip wheel: ``path``, or the one the test suite caches (``open_clip_wheel``).

    Raises ``FileNotFoundError`` naming the download command when there is none.
    """
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"no open_clip wheel at {path}")
        return path
    found = sorted(WHEEL_CACHE.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
    if not found:
        raise FileNotFoundError(
            f"no open_clip wheel in {WHEEL_CACHE}: run `python -m pip download --no-deps "
            f"open_clip_torch=={OPEN_CLIP_VERSION} -d {WHEEL_CACHE}` (or any test that uses "
            "the open_clip_wheel fixture), or pass --wheel"
        )
    return found[0]


class _FrozenBatchNorm2dStub(nn.Module):
    """Stands in for torchvision's class while open_clip imports; never instantiated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torchvision is not installed (FrozenBatchNorm2d stub)")


def load_open_clip(wheel: Path) -> OpenClip:
    """Import ``open_clip.model`` and ``open_clip.loss`` straight from the wheel (a zip).

    The ``open_clip`` package is registered without running its ``__init__``; if torchvision
    is missing, a stub of ``torchvision.ops.misc`` is present only during the import.
    """
    if "open_clip" not in sys.modules:
        package = types.ModuleType("open_clip")
        package.__path__ = [f"{wheel}/open_clip"]  # zipimport reads modules inside the wheel
        sys.modules["open_clip"] = package
    stubs: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("torchvision") is None:
        stubs = {name: types.ModuleType(name) for name in TORCHVISION_STUBS}
        stubs["torchvision.ops.misc"].FrozenBatchNorm2d = _FrozenBatchNorm2dStub  # type: ignore[attr-defined]
        stubs["torchvision"].ops = stubs["torchvision.ops"]  # type: ignore[attr-defined]
        stubs["torchvision.ops"].misc = stubs["torchvision.ops.misc"]  # type: ignore[attr-defined]
        sys.modules.update(stubs)
    try:
        model = importlib.import_module("open_clip.model")
        loss = importlib.import_module("open_clip.loss")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return OpenClip(wheel, model, loss)


def open_clip_config(oc: OpenClip, cfg: ModelConfig) -> tuple[dict[str, Any], str]:
    """open_clip's model config for ``cfg``: its own JSON when the wheel has the model,
    else ``cfg`` translated (head width 64 is implied in open_clip's configs)."""
    with zipfile.ZipFile(oc.wheel) as wheel:
        member = f"open_clip/model_configs/{cfg.name}.json"
        if member in wheel.namelist():
            own: dict[str, Any] = json.loads(wheel.read(member))
            return own, "open_clip"
    return translate_config(cfg), "translated"


def translate_config(cfg: ModelConfig) -> dict[str, Any]:
    """``cfg`` in open_clip's model_configs JSON form; ``ValueError`` unless its heads are
    64 wide (open_clip's configs imply that width)."""
    vision: dict[str, Any]
    if isinstance(cfg.vision, ViTConfig):
        if cfg.vision.width // cfg.vision.heads != 64:
            raise ValueError(f"{cfg.name}: open_clip ViTs have 64-wide heads")
        vision = {
            "image_size": cfg.vision.image_size,
            "patch_size": cfg.vision.patch_size,
            "width": cfg.vision.width,
            "layers": cfg.vision.layers,
            "mlp_ratio": cfg.vision.mlp_ratio,
        }
    else:
        assert isinstance(cfg.vision, ResNetConfig)
        if cfg.vision.width * 32 // cfg.vision.heads != 64:
            raise ValueError(f"{cfg.name}: open_clip ResNets have 64-wide attention-pool heads")
        vision = {
            "image_size": cfg.vision.image_size,
            "width": cfg.vision.width,
            "layers": list(cfg.vision.layers),
        }
    t = cfg.text
    text = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_ratio,
    }
    return {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text}


def build_open_clip(oc: OpenClip, config: dict[str, Any], quick_gelu: bool = True) -> nn.Module:
    """open_clip's ``CLIP`` with OpenAI's QuickGELU (unless ``quick_gelu`` is False),
    returning a dict (as its trainer sets)."""
    model: nn.Module = oc.model.CLIP(
        config["embed_dim"],
        vision_cfg=oc.model.CLIPVisionCfg(**config["vision_cfg"]),
        text_cfg=oc.model.CLIPTextCfg(**config["text_cfg"]),
        quick_gelu=quick_gelu,
        output_dict=True,
    )
    return model


def open_clip_optimizer(model: nn.Module, implementation: str = "default") -> torch.optim.AdamW:
    """AdamW as ``open_clip_train/main.py`` builds it: its parameter groups, and torch's
    default implementation (the for-loop on CPU), or ``"fused"``/``"foreach"`` to give
    both sides the same AdamW kernel."""

    def exclude(n: str, p: nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WEIGHT_DECAY},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        fused=True if implementation == "fused" else None,
        foreach=True if implementation == "foreach" else None,
    )


class OpenClipSide:
    """open_clip's training step (``open_clip_train/train.py``, fp32, no accumulation)."""

    def __init__(self, oc: OpenClip, model: nn.Module, adamw: str = "default") -> None:
        self.model = model
        self.loss_fn: nn.Module = oc.loss.ClipLoss(cache_labels=True)  # as create_loss builds it
        self.optimizer = open_clip_optimizer(model, adamw)

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> float:
        """One update; returns the loss."""
        self.optimizer.zero_grad()
        out = self.model(images, tokens)
        loss: torch.Tensor = self.loss_fn(**out)
        loss.backward()
        self.optimizer.step()
        scale = self.model.logit_scale
        assert isinstance(scale, nn.Parameter)
        with torch.no_grad():
            scale.clamp_(0, math.log(100))
        return float(loss.detach())


class ClipopsSide:
    """The product's ``Stepper`` on clip_core's model with the fast CPU settings."""

    def __init__(self, model: CLIP, adamw: str) -> None:
        resnet = isinstance(model.visual, ModifiedResNet)
        if resnet:
            model.set_channels_last(True)
        self.model, self.adamw = model, adamw
        optim = OptimSection(lr=LR, weight_decay=WEIGHT_DECAY, warmup_steps=0, adamw=adamw)
        optimizer = build_optimizer(model, LR, WEIGHT_DECAY, BETAS, EPS, implementation=optim.adamw)
        self.stepper = Stepper(
            model,
            raw=model,
            optimizer=optimizer,
            optim=optim,
            precision=PrecisionSection(precision="fp32", channels_last=resnet),
            device=torch.device("cpu"),
        )

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> float:
        """One update; returns the loss."""
        return self.stepper.step(images, tokens, LR).loss


def counted_forward_gflops(model: nn.Module, cfg: ModelConfig) -> float:
    """FlopCounterMode's FLOPs per pair of one forward (meta device: nothing is computed)."""
    size, length = cfg.vision.image_size, cfg.text.context_length
    with torch.device("meta"):
        images = torch.zeros(2, 3, size, size)
        tokens = torch.zeros(2, length, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(images, tokens)
    return counter.get_total_flops() / 2 / 1e9


def _features(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Both towers' normalised features, stacked [2, B, D] (eval mode, no gradient)."""
    model.eval()
    with torch.no_grad():
        out = model(images, tokens)
    model.train()
    if isinstance(out, dict):
        return torch.stack([out["image_features"], out["text_features"]])
    return torch.stack([out.image_features, out.text_features])


def _rel_update(a: nn.Module, b: nn.Module, initial: dict[str, torch.Tensor]) -> float:
    """||update_a - update_b|| / ||update_b|| over every parameter (same names on both)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    diff = norm = 0.0
    for name, before in initial.items():
        if name not in pb:
            continue  # buffers
        ua, ub = pa[name].detach() - before, pb[name].detach() - before
        diff += float((ua - ub).double().square().sum())
        norm += float(ub.double().square().sum())
    return math.sqrt(diff / norm)


def _rel_grad(a: nn.Module, b: nn.Module) -> float:
    """max |grad_a - grad_b| / max |grad_b| over every parameter (after a step's backward)."""
    ga = {n: p.grad for n, p in a.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in b.named_parameters() if p.grad is not None}
    if ga.keys() != gb.keys():
        raise RuntimeError(f"gradients of different parameters: {sorted(ga.keys() ^ gb.keys())}")
    scale = max(float(g.abs().max()) for g in gb.values())
    return max(float((ga[n] - gb[n]).abs().max()) for n in gb) / scale


def _check(what: str, value: float, tol: float) -> None:
    if not value <= tol:  # also catches NaN
        raise RuntimeError(f"clipops and open_clip differ: {what} {value:.2e} (tol {tol:.0e})")


def compare_model(
    oc: OpenClip,
    name: str,
    plan: Plan,
    adamw: str,
    *,
    seed: int = 0,
    open_clip_adamw: str | None = None,
) -> PairResult:
    """Check that both sides train the same model the same way, then time them interleaved.

    ``open_clip_adamw``: open_clip's AdamW kernel; ``None`` = the same as clipops' ``adamw``
    (the fair default), ``"default"`` = what open_clip's trainer gets from torch."""
    theirs_adamw = adamw if open_clip_adamw is None else open_clip_adamw
    cfg = get_model_config(name)
    config, source = open_clip_config(oc, cfg)
    torch.manual_seed(seed)
    ours = create_model(name)
    theirs = build_open_clip(oc, config)
    params = (count_parameters(ours), count_parameters(theirs))
    if params[0] != params[1]:
        raise RuntimeError(f"{name}: parameter counts differ: {params}")
    initial = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    theirs.load_state_dict(initial, strict=True)  # OpenAI's names and shapes on both sides
    with torch.device("meta"):
        counted = (
            counted_forward_gflops(create_model(name), cfg),
            counted_forward_gflops(build_open_clip(oc, config), cfg),
        )
    a, b = ClipopsSide(ours, adamw), OpenClipSide(oc, theirs, theirs_adamw)  # channels-last next
    images, tokens = make_inputs(ours, plan.batch, torch.Generator().manual_seed(seed))
    diff = _features(ours, images, tokens) - _features(theirs, images, tokens)  # [2, B, D]
    feature_diff = float(diff.abs().max())
    _check(f"{name} features", feature_diff, FEATURE_ATOL)
    times: dict[str, list[float]] = {"clipops": [], "open_clip": []}
    losses: dict[str, list[float]] = {"clipops": [], "open_clip": []}
    loss_diff = grad_diff = update_diff = 0.0
    for i in range(1 + plan.warmup + plan.steps):  # step 0: the checked step (not timed)
        for side, runner in (("clipops", a), ("open_clip", b)):
            start = time.perf_counter()
            losses[side].append(runner.step(images, tokens))
            if i > plan.warmup:
                times[side].append((time.perf_counter() - start) * 1e3)
        if i == 0:
            ref = losses["open_clip"][0]
            loss_diff = abs(losses["clipops"][0] - ref) / abs(ref)
            grad_diff = _rel_grad(ours, theirs)
            update_diff = _rel_update(ours, theirs, initial)
            _check(f"{name} first-step loss", loss_diff, LOSS_RTOL)
            _check(f"{name} first-step gradients", grad_diff, GRAD_RTOL)
            _check(f"{name} first-step update", update_diff, UPDATE_RTOL)
    med_a, med_b = statistics.median(times["clipops"]), statistics.median(times["open_clip"])
    return PairResult(
        model=name,
        batch=plan.batch,
        steps=plan.steps,
        open_clip_config=source,
        params_clipops=params[0],
        params_open_clip=params[1],
        forward_gflops_analytic=forward_flops(cfg) / 1e9,
        forward_gflops_counted_clipops=counted[0],
        forward_gflops_counted_open_clip=counted[1],
        feature_max_diff=feature_diff,
        loss_rel_diff=loss_diff,
        grad_rel_diff=grad_diff,
        update_rel_diff=update_diff,
        clipops_adamw=adamw,
        open_clip_adamw=theirs_adamw,
        clipops_pairs_per_s=plan.batch / (med_a / 1e3),
        open_clip_pairs_per_s=plan.batch / (med_b / 1e3),
        ratio=med_b / med_a,
        losses_clipops=losses["clipops"],
        losses_open_clip=losses["open_clip"],
        step_ms_clipops=[round(t, 3) for t in times["clipops"]],
        step_ms_open_clip=[round(t, 3) for t in times["open_clip"]],
    )


def run_comparison(
    models: Sequence[str],
    *,
    batch: int | None = None,
    steps: int | None = None,
    wheel: Path | None = None,
    open_clip_adamw: str | None = None,
) -> list[PairResult]:
    """Every model in turn (progress printed); per-model plans unless overridden;
    ``open_clip_adamw`` as in :func:`compare_model`."""
    oc = load_open_clip(find_wheel(wheel))
    adamw = "fused" if fused_adamw_available() else "foreach"
    results = []
    for name in models:
        plan = PLANS.get(name, PLANS["ViT-B-32"])
        plan = replace(plan, batch=batch or plan.batch, steps=steps or plan.steps)
        t0 = time.perf_counter()
        results.append(compare_model(oc, name, plan, adamw, open_clip_adamw=open_clip_adamw))
        r = results[-1]
        print(
            f"  {name}: clipops {r.clipops_pairs_per_s:.2f} pairs/s, open_clip "
            f"{r.open_clip_pairs_per_s:.2f} pairs/s, ratio {r.ratio:.2f}x "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return results


def format_table(results: Sequence[PairResult]) -> str:
    """Markdown table: one row per model."""
    lines = [
        "| model | batch | params (both) | fwd GFLOP/pair: analytic / counted clipops / "
        "counted open_clip | check: features / loss / grad / update | clipops pairs/s "
        "| open_clip pairs/s | clipops / open_clip |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.batch} | {r.params_clipops:,} "
            f"| {r.forward_gflops_analytic:.3g} / {r.forward_gflops_counted_clipops:.3g} / "
            f"{r.forward_gflops_counted_open_clip:.3g} "
            f"| {r.feature_max_diff:.0e} / {r.loss_rel_diff:.0e} / {r.grad_rel_diff:.0e} / "
            f"{r.update_rel_diff:.0e} "
            f"| {r.clipops_pairs_per_s:.2f} | {r.open_clip_pairs_per_s:.2f} "
            f"| **{r.ratio:.2f}x** |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.vs_open_clip",
        description="Training pairs/s of clipops and open_clip on the same model, same process.",
    )
    p.add_argument("--models", nargs="+", default=list(PLANS), metavar="NAME")
    p.add_argument("--batch", type=int, help="pairs per step (default: per model)")
    p.add_argument("--steps", type=int, help="timed steps per side (default: per model)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--wheel", type=Path, help=f"open_clip_torch wheel (default: {WHEEL_CACHE})")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    p.add_argument(
        "--open-clip-adamw",
        choices=("same", "default"),
        default="same",
        help="open_clip's AdamW: the same kernel as clipops (default), or torch's default "
        "(what open_clip's trainer gets: the for-loop on CPU)",
    )
    args = p.parse_args(argv)
    check_args(p, args, models=args.models)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, print the table, optionally write JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    load = load_average()
    print(machine_line(info, load), flush=True)
    started = time.perf_counter()
    try:
        results = run_comparison(
            args.models,
            batch=args.batch,
            steps=args.steps,
            wheel=args.wheel,
            open_clip_adamw=None if args.open_clip_adamw == "same" else "default",
        )
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    load_end = load_average()
    print()
    print(format_table(results))
    print(f"\ntotal {elapsed:.1f} s | load {' '.join(load_end)}")
    if args.json is not None:
        payload = {
            "machine": info,
            "load_start": load,
            "load_end": load_end,
            "elapsed_s": round(elapsed, 2),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
