"""bench.speed: the analytic FLOP counter, the batch search, the CPU variants and their checks.

The analytic FLOPs (bench.flops) are compared with torch's FlopCounterMode, which counts
every matmul and convolution the model actually dispatches (on the meta device for the big
models, so nothing is computed). The CPU mode is run end to end at a tiny batch: every
optimisation must pass the equivalence check against the baseline, and the check must reject
a variant that computes a different loss.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import cpu_speed, flops, speed, vs_open_clip
from bench.data_speed import DataResult, format_data_table
from bench.train_step import make_inputs
from clip_core.checkpoint import load_checkpoint, save_checkpoint
from clip_core.model import CLIP, ClipOutput, count_parameters
from clip_core.registry import create_model, get_model_config
from clip_core.resnet import ModifiedResNet
from clip_train.optim import build_optimizer


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _counted_forward(model: CLIP, batch: int) -> tuple[int, ClipOutput]:
    """FLOPs FlopCounterMode counts for one forward (naive attention: plain matmuls)."""
    cpu_speed.set_attention(model, "naive")  # CPU SDPA kernels are not counted by torch
    cfg = model.config
    images = torch.zeros(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.zeros(batch, cfg.text.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        out = model(images, tokens)
    return counter.get_total_flops(), out


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_analytic_forward_flops_match_counted_on_real_configs(name: str) -> None:
    cfg = get_model_config(name)
    with torch.device("meta"):
        model = CLIP(cfg)
        counted, _ = _counted_forward(model, batch=2)
    analytic = flops.forward_flops(cfg)
    # RN50's attention pool keeps SDPA (uncounted): 4*T*C = 0.002% of the forward.
    assert abs(counted / 2 - analytic) / analytic < 1e-3, (counted / 2, analytic)


def test_train_flops_are_three_forwards_as_counted_through_backward() -> None:
    torch.manual_seed(0)
    model = create_model("tiny-vit")
    fwd, out = _counted_forward(model, batch=2)
    with FlopCounterMode(display=False) as counter:
        (out.image_features.sum() + out.text_features.sum()).backward()
    per_pair = (fwd + counter.get_total_flops()) / 2
    expected = flops.train_flops_per_pair(model.config)
    assert expected == 3 * flops.forward_flops(model.config)
    # The patch conv needs no input gradient (images are leaves): backward < 2x forward there.
    assert 0.97 < per_pair / expected <= 1.0, per_pair / expected


def test_peak_lookup_and_mfu() -> None:
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("Tesla T4") is None
    assert flops.mfu(1000.0, 10**9, 1e13) == pytest.approx(0.1)


def test_largest_fitting_doubles_then_bisects() -> None:
    calls: list[int] = []

    def fits_below(limit: int) -> Callable[[int], bool]:
        def fits(b: int) -> bool:
            calls.append(b)
            return b <= limit

        return fits

    assert speed.largest_fitting(fits_below(300), 64, 4096) == 288
    assert len(calls) < 10, calls
    assert speed.largest_fitting(fits_below(10**6), 64, 4096) == 4096
    assert speed.largest_fitting(fits_below(40), 64, 4096) == 32
    assert speed.largest_fitting(fits_below(10), 64, 4096) == 0


def test_channels_last_resnet_same_features_and_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = create_model("tiny-rn")
    nhwc = create_model("tiny-rn")
    nhwc.load_state_dict(plain.state_dict())
    plain.eval(), nhwc.eval()  # BatchNorm statistics stay as loaded
    assert isinstance(nhwc.visual, ModifiedResNet)
    nhwc.visual.set_channels_last(True)
    assert nhwc.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nhwc.visual.conv1.weight.is_contiguous()
    images, tokens = make_inputs(plain, 4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain(images, tokens), nhwc(images, tokens)
    assert torch.allclose(a.image_features, b.image_features, atol=1e-5)
    loaded = load_checkpoint(save_checkpoint(nhwc, tmp_path / "ckpt")).model
    for key, value in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_adamw_implementations_give_the_same_update() -> None:
    updates = []
    for impl in ("for-loop", "foreach", "fused"):
        torch.manual_seed(0)
        model = create_model("tiny-vit")
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(model, 1e-3, 0.2, implementation=impl)
        images, tokens = make_inputs(model, 2, torch.Generator().manual_seed(0))
        out = model(images, tokens)
        (out.image_features @ out.text_features.T).sum().backward()
        opt.step()
        with torch.no_grad():
            deltas = [(p - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
        updates.append(torch.cat(deltas))
    assert updates[0].abs().max() > 1e-4  # a real step happened
    for other in updates[1:]:  # fused kernels round differently: relative L2 of the update
        assert float((other - updates[0]).norm() / updates[0].norm()) < 1e-5
    with pytest.raises(ValueError, match="AdamW implementation"):
        build_optimizer(model, 1e-3, 0.2, implementation="adam")


def test_cpu_mode_runs_every_variant_and_checks_them() -> None:
    result = cpu_speed.bench_cpu_model(
        "tiny-rn", cpu_speed.CpuPlan(batch=4, steps=1, warmup=0), compile_=False
    )
    names = [v.name for v in result.variants]
    assert names[0] == "baseline" and names[-1] == "all"
    assert {"sdpa", "foreach", "channels-last", "local-rows"} <= set(names)
    base = result.variants[0]
    assert base.speedup == 1.0 and base.update_rel_diff == 0.0
    for v in result.variants:
        assert v.pairs_per_s > 0 and len(v.step_ms) == 1
        assert v.update_rel_diff <= cpu_speed.UPDATE_RTOL
    table = cpu_speed.format_cpu_table([result])
    assert table.count("| tiny-rn |") == len(names)


class OneRankCheck(cpu_speed.Bench):
    """A broken check: the local-rows variant scores one rank's rows only."""

    def loss(self, v: cpu_speed.Variant, out: ClipOutput, both_ranks: bool = False) -> torch.Tensor:
        return super().loss(v, out, both_ranks=False)


def test_check_rejects_a_variant_with_a_different_loss() -> None:
    bench = cpu_speed.Bench("tiny-vit", batch=4)
    variants = [cpu_speed.Variant("baseline"), cpu_speed.Variant("local-rows", loss="local")]
    diffs = cpu_speed.check_variants(bench, variants)
    assert diffs["local-rows"][0] < cpu_speed.LOSS_RTOL
    broken = OneRankCheck("tiny-vit", batch=4)
    with pytest.raises(RuntimeError, match="local-rows differs from the baseline"):
        cpu_speed.check_variants(broken, variants)


def test_gpu_step_path_on_cpu_reports_flops_and_mfu() -> None:
    r = speed.bench_gpu_step(
        "tiny-rn",
        2,
        torch.device("cpu"),
        steps=1,
        warmup=0,
        compile_model_=False,
        grad_checkpointing=True,
        peak=1e12,
    )
    assert r.peak_memory_gib is None and r.precision == "bf16"
    assert r.train_flops_per_pair == flops.train_flops_per_pair(get_model_config("tiny-rn"))
    assert r.mfu == pytest.approx(r.pairs_per_s * r.train_flops_per_pair / 1e12)
    assert "| tiny-rn | 2 |" in speed.format_gpu_table([r])


def test_data_table_states_the_cores_per_gpu_formula() -> None:
    rows = [DataResult(224, 2, 256, 400.0, 200.0, 180.0)]
    assert "| n/a |" in format_data_table(rows, None)
    text = format_data_table(rows, 3000.0)
    assert "| 15.0 |" in text and "GPU training pairs/s / Ray Data pairs/s per core" in text


@pytest.mark.network
def test_open_clip_comparison_trains_the_same_model_on_both_sides(open_clip_wheel: Path) -> None:
    """bench.vs_open_clip on tiny-rn: same parameters, features, loss and update, then timed."""
    oc = vs_open_clip.load_open_clip(open_clip_wheel)
    assert importlib.util.find_spec("torchvision") is not None or "torchvision" not in sys.modules
    plan = vs_open_clip.Plan(batch=4, steps=1, warmup=0)
    r = vs_open_clip.compare_model(oc, "tiny-rn", plan, adamw="fused")
    assert r.params_clipops == r.params_open_clip == count_parameters(create_model("tiny-rn"))
    assert r.open_clip_config == "translated"  # open_clip has no tiny-rn config of its own
    losses = r.losses_clipops + r.losses_open_clip
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    # one step of each from the same weights: the next losses still agree
    assert abs(r.losses_clipops[1] - r.losses_open_clip[1]) < 1e-4 * abs(r.losses_open_clip[1])
    assert r.feature_max_diff <= vs_open_clip.FEATURE_ATOL
    assert r.grad_rel_diff <= vs_open_clip.GRAD_RTOL
    assert r.update_rel_diff <= vs_open_clip.UPDATE_RTOL
    assert r.forward_gflops_counted_clipops == pytest.approx(r.forward_gflops_analytic, rel=1e-3)
    # open_clip's attention pool computes every token's output (clipops: the pooled one only)
    assert r.forward_gflops_counted_open_clip > r.forward_gflops_counted_clipops
    assert r.clipops_pairs_per_s > 0 and r.open_clip_pairs_per_s > 0
    assert r.ratio == pytest.approx(r.clipops_pairs_per_s / r.open_clip_pairs_per_s)
    assert "| tiny-rn | 4 | 2,699,289 |" in vs_open_clip.format_table([r])


@pytest.mark.network
def test_open_clip_comparison_rejects_a_different_model(
    open_clip_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same parameter names and shapes but GELU instead of QuickGELU: the check must fail."""
    oc = vs_open_clip.load_open_clip(open_clip_wheel)

    gelu_model = functools.partial(vs_open_clip.build_open_clip, quick_gelu=False)
    monkeypatch.setattr(vs_open_clip, "build_open_clip", gelu_model)
    plan = vs_open_clip.Plan(batch=2, steps=1, warmup=0)
    with pytest.raises(RuntimeError, match="tiny-vit features"):
        vs_open_clip.compare_model(oc, "tiny-vit", plan, adamw="foreach")


@pytest.mark.network
def test_open_clip_comparison_rejects_a_different_optimiser_step(
    open_clip_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_clip's AdamW at twice the learning rate: the first-step update check must fail."""
    oc = vs_open_clip.load_open_clip(open_clip_wheel)
    original = vs_open_clip.open_clip_optimizer

    def doubled_lr(model: torch.nn.Module, implementation: str = "default") -> torch.optim.AdamW:
        optimizer = original(model, implementation)
        for group in optimizer.param_groups:
            group["lr"] *= 2
        return optimizer

    monkeypatch.setattr(vs_open_clip, "open_clip_optimizer", doubled_lr)
    plan = vs_open_clip.Plan(batch=2, steps=1, warmup=0)
    with pytest.raises(RuntimeError, match="tiny-vit first-step update"):
        vs_open_clip.compare_model(oc, "tiny-vit", plan, adamw="foreach")
