"""The training step: 2 DDP workers == 1 process on the global batch; exact accumulation."""

from __future__ import annotations

import math
import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_workers import fast_stepper, make_batch, make_model, optimised_step_worker
from safetensors.torch import load_file
from train_workers import MODEL, make_stepper, step_worker, zero_worker

from clip_core.checkpoint import load_checkpoint
from clip_train.config import OptimSection, PrecisionSection
from clip_train.optim import build_optimizer
from clip_train.step import Stepper, compile_model

N, STEPS = 8, 3


def single_process(accum: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """STEPS steps on the full global batch (2N) in this process."""
    raw = make_model(MODEL, 0, torch.float32)
    stepper = make_stepper(raw, raw, accum)
    losses = []
    for step in range(STEPS):
        images, tokens = make_batch(MODEL, 2 * N, seed=100 + step, dtype=torch.float32)
        losses.append(stepper.step(images, tokens, lr=1e-3).loss)
    return torch.tensor(losses), {k: v.detach() for k, v in raw.state_dict().items()}


def spawn_two(target: Callable[..., None], *args: object) -> None:
    """Run ``target(rank, 2, *args)`` in 2 spawned processes; both must exit 0."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, 2, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def run_distributed(tmp: Path, accum: int) -> dict[str, torch.Tensor]:
    """2 spawned gloo processes, each with N rows per step."""
    spawn_two(step_worker, str(tmp / f"rendezvous-{accum}"), str(tmp), (N, STEPS, accum))
    return load_file(str(tmp / f"dist-accum{accum}.safetensors"))


@pytest.mark.parametrize("accum", [1, 2])
def test_two_workers_reproduce_one_process_on_the_global_batch(tmp_path: Path, accum: int) -> None:
    """Losses of the first steps and the weights after them match within fp32 tolerance."""
    ref_losses, ref_params = single_process(accum=1)
    got = run_distributed(tmp_path, accum)
    torch.testing.assert_close(got["losses"], ref_losses, rtol=1e-5, atol=1e-5)
    init = make_model(MODEL, 0, torch.float32).state_dict()
    moved = max(float((ref_params[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-4  # the steps did something
    for name, ref in ref_params.items():
        torch.testing.assert_close(got[f"param.{name}"], ref, rtol=1e-4, atol=1e-5, msg=name)


def test_zero1_shards_adamw_state_and_gives_the_same_update(tmp_path: Path) -> None:
    """optim.sharding=zero1 on 2 gloo ranks: the weights equal one process's on the global
    batch, each rank holds the moments of only part of the parameters, and a checkpoint
    (consolidated, safetensors) reloaded into a new sharded optimiser continues exactly."""
    spawn_two(zero_worker, str(tmp_path / "rendezvous-zero"), str(tmp_path), (N, STEPS))
    got = load_file(str(tmp_path / "zero.safetensors"))
    _, ref_params = single_process(accum=1)
    for name, ref in ref_params.items():
        torch.testing.assert_close(got[f"after.{name}"], ref, rtol=1e-4, atol=1e-5, msg=name)
    counts, total = got["counts"].tolist(), int(got["total"])
    assert all(0 < c < total for c in counts) and sum(counts) == total, (counts, total)
    for name in ref_params:
        torch.testing.assert_close(got[f"reloaded.{name}"], got[f"continued.{name}"], msg=name)
    moved = max(float((got[f"continued.{k}"] - got[f"after.{k}"]).abs().max()) for k in ref_params)
    assert moved > 1e-5  # the extra step did something


def test_accumulation_is_exact_in_one_process() -> None:
    """accum_steps=4 gives the same update as one pass over the whole batch."""
    losses1, params1 = single_process(accum=1)
    losses4, params4 = single_process(accum=4)
    torch.testing.assert_close(losses4, losses1, rtol=1e-5, atol=1e-6)
    for name, ref in params1.items():
        torch.testing.assert_close(params4[name], ref, rtol=1e-4, atol=1e-5, msg=name)


def test_naive_accumulation_would_differ() -> None:
    """The test above can fail: per-micro-batch losses (fewer negatives) give another value."""
    from clip_core.loss import contrastive_loss

    raw = make_model(MODEL, 0, torch.float32)
    images, tokens = make_batch(MODEL, 2 * N, seed=100, dtype=torch.float32)
    with torch.no_grad():
        out = raw(images, tokens)
        full = contrastive_loss(out.image_features, out.text_features, out.logit_scale)
        halves = [
            contrastive_loss(out.image_features[s], out.text_features[s], out.logit_scale)
            for s in (slice(0, N), slice(N, 2 * N))
        ]
    assert abs(float(full) - float(sum(halves)) / 2) > 1e-3


def test_gradient_checkpointing_gives_the_same_update() -> None:
    """precision.grad_checkpointing trades compute for memory, not results."""
    _, plain = single_process(accum=1)
    raw = make_model(MODEL, 0, torch.float32)
    raw.set_grad_checkpointing(True)  # type: ignore[operator]
    stepper = make_stepper(raw, raw, 1)
    for step in range(STEPS):
        images, tokens = make_batch(MODEL, 2 * N, seed=100 + step, dtype=torch.float32)
        stepper.step(images, tokens, lr=1e-3)
    for name, ref in plain.items():
        torch.testing.assert_close(raw.state_dict()[name], ref, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_model_gives_the_same_update() -> None:
    """precision.compile: Dynamo traces the model's forward and backward without changing them.

    ``aot_eager`` checks the traced graphs; the ``inductor`` backend (generated C++ kernels)
    passed the same check by hand, but its codegen takes ~3 minutes on 2 CPU cores
    (docs/training.md).
    """
    _, plain = single_process(accum=1)
    raw = make_model(MODEL, 0, torch.float32)
    stepper = make_stepper(compile_model(raw, "aot_eager"), raw, 1)
    for step in range(STEPS):
        images, tokens = make_batch(MODEL, 2 * N, seed=100 + step, dtype=torch.float32)
        stepper.step(images, tokens, lr=1e-3)
    for name, ref in plain.items():
        torch.testing.assert_close(raw.state_dict()[name], ref, rtol=1e-4, atol=1e-5, msg=name)


def _mixed_precision_run(precision: str) -> tuple[torch.nn.Module, list[float], Stepper]:
    raw = make_model(MODEL, 0, torch.float32)
    optim = OptimSection(lr=1e-3, warmup_steps=0, grad_clip_norm=1.0)
    opt = build_optimizer(raw, optim.lr, optim.weight_decay, (optim.beta1, optim.beta2), optim.eps)
    stepper = Stepper(
        raw,
        raw=raw,  # type: ignore[arg-type]
        optimizer=opt,
        optim=optim,
        precision=PrecisionSection(precision=precision),
        device=torch.device("cpu"),
        allow_cpu_autocast=True,
    )
    losses = []
    for step in range(STEPS):
        images, tokens = make_batch(MODEL, 2 * N, seed=100 + step, dtype=torch.float32)
        losses.append(stepper.step(images, tokens, lr=1e-3).loss)
    return raw, losses, stepper


def test_bf16_autocast_path_tracks_fp32() -> None:
    """The GPU bf16 path (autocast, fp32 master weights, no scaler), run on CPU."""
    fp32, fp32_losses, _ = _mixed_precision_run("fp32")
    bf16, bf16_losses, stepper = _mixed_precision_run("bf16")
    assert stepper.dtype == torch.bfloat16 and not stepper.scaler.is_enabled()
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert bf16_losses != fp32_losses  # autocast really ran in bf16
    for a, b in zip(bf16_losses, fp32_losses, strict=True):
        assert abs(a - b) < 0.05, (bf16_losses, fp32_losses)
    # Adam normalises each coordinate's step, so bf16 noise flips small coordinates; the update
    # as a whole must point the same way as fp32's
    init = make_model(MODEL, 0, torch.float32).state_dict()
    delta_bf16 = torch.cat([(p - init[n]).flatten() for n, p in bf16.state_dict().items()])
    delta_fp32 = torch.cat([(p - init[n]).flatten() for n, p in fp32.state_dict().items()])
    cosine = F.cosine_similarity(delta_bf16, delta_fp32, dim=0).item()
    assert cosine > 0.9, cosine


def test_fp16_path_scales_the_loss_and_skips_overflowing_steps() -> None:
    """fp16 autocast + GradScaler: an overflowing step is skipped and the scale backs off."""
    raw, losses, stepper = _mixed_precision_run("fp16")
    assert stepper.dtype == torch.float16 and stepper.scaler.is_enabled()
    assert stepper.scaler.get_scale() < 2.0**16  # the initial scale overflowed at least once
    assert all(torch.isfinite(p).all() for p in raw.parameters())
    assert all(p.dtype == torch.float32 for p in raw.parameters())
    assert all(math.isfinite(loss) for loss in losses)
    fresh = make_model(MODEL, 0, torch.float32)
    changed = [n for n, p in raw.state_dict().items() if not torch.equal(p, fresh.state_dict()[n])]
    assert changed  # the steps that did not overflow were applied


def test_the_run_seed_fixes_the_weights_and_the_steps() -> None:
    """The worker's model is a function of ``cfg.seed`` (``build_model``), and the same batches
    give bit-identical weights after a few steps; another seed gives other weights."""
    from clip_core import get_model_config
    from clip_train.loop import JobSpec, build_model

    config = get_model_config(MODEL).to_dict()
    job = JobSpec(config, [], 77, steps_per_epoch=3, total_steps=3, tracking=None)

    def trained(seed: int) -> dict[str, torch.Tensor]:
        raw = build_model(job, seed)
        stepper = make_stepper(raw, raw, 1)
        for step in range(STEPS):
            images, tokens = make_batch(MODEL, 2 * N, seed=100 + step, dtype=torch.float32)
            stepper.step(images, tokens, lr=1e-3)
        return {k: v.detach().clone() for k, v in raw.state_dict().items()}

    first, again, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# Every CPU optimisation of issue 10 on 2 workers (compile aside: it has its own test above):
# DDP + local-rows loss + fused attention (the library default) + fused AdamW + channels-last
# ResNet convolutions. (tiny-vit with foreach AdamW is the first test of this file.)
OPTIMISED = [
    {
        "id": f"{m}-fast",
        "model": m,
        "n": str(N),
        "steps": str(STEPS),
        "adamw": a,
        "channels_last": c,
    }
    for m, a, c in [("tiny-rn", "fused", "1"), ("tiny-vit", "fused", "0")]
]


@pytest.fixture(scope="module")
def optimised_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both OPTIMISED specs in 2 spawned gloo processes (one start-up for both)."""
    tmp = tmp_path_factory.mktemp("optimised")
    spawn_two(optimised_step_worker, str(tmp / "rendezvous"), str(tmp), OPTIMISED)
    return tmp


def plain_single_process(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference: one process, global batch, NCHW, for-loop AdamW, no optimisation."""
    raw = make_model(name, 0, torch.float32)
    stepper = fast_stepper(raw, raw, "for-loop")  # type: ignore[arg-type]
    losses = []
    for step in range(STEPS):
        images, tokens = make_batch(name, 2 * N, seed=100 + step, dtype=torch.float32)
        losses.append(stepper.step(images, tokens, lr=1e-3).loss)
    return torch.tensor(losses), {k: v.detach() for k, v in raw.state_dict().items()}


@pytest.mark.usefixtures("torch_single_thread")
@pytest.mark.parametrize("spec", OPTIMISED, ids=[s["id"] for s in OPTIMISED])
def test_two_optimised_workers_reproduce_the_plain_one_process_run(
    optimised_runs: Path, spec: dict[str, str]
) -> None:
    """Losses and weights after STEPS steps with every optimisation on == the plain run."""
    got = load_file(str(optimised_runs / f"{spec['id']}.safetensors"))
    ref_losses, ref_params = plain_single_process(spec["model"])
    torch.testing.assert_close(got["losses"], ref_losses, rtol=1e-5, atol=1e-5)
    init = make_model(spec["model"], 0, torch.float32).state_dict()
    moved = max(float((ref_params[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-4  # the steps did something
    for name, ref in ref_params.items():
        torch.testing.assert_close(got[f"param.{name}"], ref, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.usefixtures("torch_single_thread")
def test_checkpoint_of_a_channels_last_model_round_trips(optimised_runs: Path) -> None:
    """The NHWC model trained on 2 workers, saved and loaded: same weights, same outputs."""
    got = load_file(str(optimised_runs / "tiny-rn-fast.safetensors"))
    loaded = load_checkpoint(optimised_runs / "tiny-rn-fast-ckpt").model
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, got[f"param.{name}"]), name
    images, tokens = make_batch("tiny-rn", 2 * N, seed=100, dtype=torch.float32)
    loaded.eval()
    for channels_last in (False, True):  # loaded as saved (contiguous), then NHWC again
        loaded.set_channels_last(channels_last)
        with torch.no_grad():
            out = loaded(images, tokens)
        torch.testing.assert_close(out.image_features, got["features.image"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.text_features, got["features.text"], rtol=0, atol=1e-5)
