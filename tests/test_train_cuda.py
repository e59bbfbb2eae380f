"""The training step on a real CUDA device: the GPU paths the CPU tests can only imitate.

bench/gpu_check.sh runs this file on a GPU machine; without CUDA every test is skipped with
the reason below. What is checked, on tiny-vit so the file takes seconds (plus one inductor
compile):

- bf16 autocast (no scaler, fp32 master weights): the matmuls really run in bf16 on the GPU,
  the loss is finite and the weights move;
- fp16 autocast with a GradScaler: finite loss and weights, fp32 weights, an enabled scaler
  with a finite positive scale, and the steps that did not overflow were applied;
- ``torch.compile`` (inductor, the GPU recipes' backend) gives the same step as eager: same
  losses and, over all weights, the same update within fp32 tolerance (TF32 off);
- ``clip_train.device_check`` on the real device: the installed build has kernels for this
  GPU's compute capability and ``check_device`` accepts it (bf16 from sm_80, else fp16 and a
  refusal of bf16).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from bench.train_step import make_inputs
from clip_core.model import CLIP
from clip_core.registry import create_model
from clip_train.config import OptimSection, PrecisionSection
from clip_train.device_check import DeviceError, check_device, current_device_info, runs_on
from clip_train.optim import build_optimizer
from clip_train.step import Stepper, compile_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (torch.cuda.is_available() is False); "
    "bench/gpu_check.sh runs these on a GPU machine",
)

MODEL, N, STEPS, LR = "tiny-vit", 16, 3, 1e-3


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32, so compiled and eager can be compared."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_model(seed: int = 0) -> CLIP:
    """tiny-vit on the GPU, the same weights for the same seed."""
    torch.manual_seed(seed)
    model = create_model(MODEL).cuda()
    model.train()
    return model


def cuda_stepper(raw: CLIP, precision: str, model: nn.Module | None = None) -> Stepper:
    """The product's Stepper on cuda: fused AdamW, clip 1.0, no warm-up."""
    optim = OptimSection(lr=LR, warmup_steps=0, grad_clip_norm=1.0, adamw="fused")
    betas = (optim.beta1, optim.beta2)
    opt = build_optimizer(
        raw, optim.lr, optim.weight_decay, betas, optim.eps, implementation=optim.adamw
    )
    return Stepper(
        raw if model is None else model,
        raw=raw,
        optimizer=opt,
        optim=optim,
        precision=PrecisionSection(precision=precision),
        device=torch.device("cuda"),
    )


def cuda_batch(raw: CLIP, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images [N, 3, R, R] and token ids [N, L] with an EOS each, on the GPU."""
    images, tokens = make_inputs(raw, N, torch.Generator().manual_seed(seed))
    return images.cuda(), tokens.cuda()


def train(stepper: Stepper, raw: CLIP) -> list[float]:
    """STEPS steps on fixed batches; the losses."""
    return [stepper.step(*cuda_batch(raw, 100 + s), lr=LR).loss for s in range(STEPS)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def largest_change(model: nn.Module, before: dict[str, torch.Tensor]) -> float:
    """The largest absolute change of any weight since ``before``."""
    return max(float((v - before[k]).abs().max()) for k, v in model.state_dict().items())


def test_bf16_autocast_step_runs_in_bf16_and_updates_fp32_weights() -> None:
    raw = cuda_model()
    before = snapshot(raw)
    stepper = cuda_stepper(raw, "bf16")
    seen: list[torch.dtype] = []
    linear = next(m for m in raw.modules() if isinstance(m, nn.Linear))
    hook = linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        losses = train(stepper, raw)
    finally:
        hook.remove()
    assert stepper.dtype == torch.bfloat16 and not stepper.scaler.is_enabled()
    assert seen and all(d == torch.bfloat16 for d in seen), seen  # autocast really ran
    assert all(math.isfinite(loss) for loss in losses), losses
    assert all(p.dtype == torch.float32 and p.is_cuda for p in raw.parameters())
    assert all(torch.isfinite(p).all() for p in raw.parameters())
    assert largest_change(raw, before) > 1e-5


def test_fp16_step_with_grad_scaler_stays_finite_and_applies_updates() -> None:
    raw = cuda_model()
    before = snapshot(raw)
    stepper = cuda_stepper(raw, "fp16")
    losses = train(stepper, raw)
    assert stepper.dtype == torch.float16 and stepper.scaler.is_enabled()
    scale = stepper.scaler.get_scale()
    assert math.isfinite(scale) and scale > 0
    assert all(math.isfinite(loss) for loss in losses), losses
    assert all(p.dtype == torch.float32 for p in raw.parameters())
    assert all(torch.isfinite(p).all() for p in raw.parameters())
    assert largest_change(raw, before) > 1e-5  # not every step was skipped as an overflow


@pytest.mark.usefixtures("no_tf32")
def test_compiled_step_matches_eager() -> None:
    """inductor on the GPU: the same losses (rel 1e-4) and update (rel L2 1e-2) as eager."""
    eager_raw, compiled_raw = cuda_model(), cuda_model()
    init = snapshot(eager_raw)
    eager_losses = train(cuda_stepper(eager_raw, "fp32"), eager_raw)
    compiled = compile_model(compiled_raw, "inductor")
    try:
        compiled_losses = train(cuda_stepper(compiled_raw, "fp32", compiled), compiled_raw)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(
        torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5
    )
    eager_state, compiled_state = eager_raw.state_dict(), compiled_raw.state_dict()
    delta_eager = torch.cat([(eager_state[k] - init[k]).flatten() for k in init])
    delta_compiled = torch.cat([(compiled_state[k] - init[k]).flatten() for k in init])
    assert float(delta_eager.norm()) > 1e-4  # the steps did something
    relative = float((delta_compiled - delta_eager).norm() / delta_eager.norm())
    assert relative < 1e-2, relative


def test_device_check_accepts_this_gpu_and_the_build_has_its_kernels() -> None:
    info = current_device_info(torch.cuda.current_device())
    major, minor = info.capability
    assert info.arch_list, "torch.cuda.get_arch_list() is empty"
    assert runs_on(info.capability, info.arch_list), (
        f"{info.name} is sm_{major}{minor}; the build has {info.arch_list}"
    )
    check_device(info, "fp16")  # raises DeviceError when the build cannot run this GPU
    if info.capability >= (8, 0):
        check_device(info, "bf16")
    else:
        with pytest.raises(DeviceError, match="no bf16 tensor cores"):
            check_device(info, "bf16")
    x = torch.ones(64, 64, device="cuda")
    assert float((x @ x).sum()) == 64**3  # a kernel of this build really runs on this GPU
