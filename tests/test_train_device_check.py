"""clip_train.device_check: a GPU the torch build cannot run, or bf16 without tensor cores,
is refused before the first kernel, with the GPU, the build and the fix named."""

from __future__ import annotations

import pytest

from clip_train.device_check import DeviceError, DeviceInfo, check_device, runs_on
from clip_train.run import _root_cause

CU13 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
CU126 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")


def _gpu(name: str, capability: tuple[int, int], arch: tuple[str, ...]) -> DeviceInfo:
    return DeviceInfo(name, capability, arch, "2.13.0+cu130", "13.0")


@pytest.mark.parametrize(
    ("capability", "arch", "expected"),
    [
        ((7, 0), CU13, False),  # V100 on a CUDA 13 build: no sm_70 SASS, PTX only for 12.0
        ((7, 0), CU126, True),
        ((8, 0), CU13, True),  # A100
        ((8, 9), ("sm_80", "sm_86"), True),  # L4/4090: sm_86 SASS runs on 8.9
        ((8, 6), ("sm_89",), False),  # newer minor SASS does not run on an older one
        ((9, 0), ("sm_80", "compute_80"), True),  # H100 through the PTX
        ((9, 0), ("sm_80",), False),  # SASS of another major does not run
        ((12, 0), ("sm_90a", "compute_90"), True),
    ],
)
def test_compatibility_rules(
    capability: tuple[int, int], arch: tuple[str, ...], expected: bool
) -> None:
    assert runs_on(capability, arch) is expected


def test_v100_on_a_cuda13_build_names_gpu_build_and_fix() -> None:
    v100 = _gpu("Tesla V100-SXM2-32GB", (7, 0), CU13)
    with pytest.raises(DeviceError) as caught:
        check_device(v100, "fp16")
    text = str(caught.value)
    assert "Tesla V100-SXM2-32GB (sm_70) cannot run torch 2.13.0+cu130 (CUDA 13.0)" in text
    assert "sm_75, sm_80" in text and "CUDA 12.6 build" in text
    assert "./dev install --cuda=v100" in text and "requirements-v100.lock" in text
    assert "\n" not in text


def test_bf16_is_refused_without_tensor_cores_and_allowed_with() -> None:
    v100 = _gpu("Tesla V100", (7, 0), CU126)
    check_device(v100, "fp16")
    with pytest.raises(DeviceError, match=r"Tesla V100 \(sm_70\) has no bf16.*precision=fp16"):
        check_device(v100, "bf16")
    check_device(_gpu("NVIDIA A100-SXM4-80GB", (8, 0), CU13), "bf16")
    check_device(_gpu("NVIDIA H200", (9, 0), CU13), "bf16")


def test_the_driver_surfaces_the_device_error_from_rays_wrapping() -> None:
    cause = DeviceError("Tesla V100 (sm_70) cannot run ...")
    try:
        try:
            raise cause
        except DeviceError as exc:
            raise RuntimeError("TrainingFailedError: worker group failed") from exc
    except RuntimeError as wrapped:
        assert _root_cause(wrapped) is cause
