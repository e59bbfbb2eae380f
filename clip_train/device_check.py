"""Refuse a GPU that the installed torch build cannot run, before the first kernel does.

A torch wheel carries compiled kernels (SASS, ``sm_XY``) for some GPU architectures and
possibly PTX (``compute_XY``) that the driver can compile for newer ones. A V100 (sm_70) with
a build that has neither fails at its first kernel with "no kernel image is available for
execution on the device", deep inside the first training step. :func:`check_device` makes the
same decision up front and says what to install instead; it also refuses bf16 on GPUs
without bf16 tensor cores (compute capability below 8.0), which would otherwise run emulated
or fail.

The rules (CUDA's compatibility model): SASS for ``sm_AB`` runs on a device of capability
``(A, b)`` with ``b >= B`` (same major, newer minor); PTX for ``compute_AB`` runs, compiled
by the driver, on any capability ``>= (A, B)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: What to install for an architecture the default wheels dropped (by compute capability).
BUILD_FOR_OLD_GPUS = (
    "the CUDA 12.6 build of torch from PyTorch's wheel index (the last builds with sm_70 "
    "kernels; PyPI's default Linux wheels are CUDA 13 builds without them): "
    "`./dev install --cuda=v100` (requirements-v100.lock)"
)
_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)[a-z]?$")


class DeviceError(RuntimeError):
    """The GPU cannot run this torch build or this precision; the message says what to do."""


@dataclass(frozen=True)
class DeviceInfo:
    """What the check needs to know of one GPU and the installed build."""

    name: str  # e.g. "Tesla V100-SXM2-32GB"
    capability: tuple[int, int]  # e.g. (7, 0)
    arch_list: tuple[str, ...]  # torch.cuda.get_arch_list(), e.g. ("sm_80", "sm_90")
    torch_version: str  # torch.__version__, e.g. "2.13.0+cu130"
    cuda_version: str | None  # torch.version.cuda, e.g. "13.0"


def runs_on(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a build with ``arch_list`` has code a GPU of ``capability`` can run."""
    major, minor = capability
    for arch in arch_list:
        match = _ARCH.match(arch)
        if match is None:
            continue
        kind, arch_major, arch_minor = match.group(1), int(match.group(2)), int(match.group(3))
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def check_device(info: DeviceInfo, precision: str) -> None:
    """Raise :class:`DeviceError` when ``info``'s GPU cannot train with this build/precision."""
    sm = f"sm_{info.capability[0]}{info.capability[1]}"
    build = f"torch {info.torch_version} (CUDA {info.cuda_version or 'none'})"
    if not runs_on(info.capability, info.arch_list):
        fix = (
            BUILD_FOR_OLD_GPUS
            if info.capability < (7, 5)
            else "a torch build whose `torch.cuda.get_arch_list()` includes it"
        )
        kernels = ", ".join(info.arch_list) or "none"
        raise DeviceError(
            f"{info.name} ({sm}) cannot run {build}: its kernels are for {kernels}; install {fix}"
        )
    if precision == "bf16" and info.capability < (8, 0):
        raise DeviceError(
            f"{info.name} ({sm}) has no bf16 tensor cores; train it with "
            "precision.precision=fp16 (a grad scaler is used) or on an A100/H100-class GPU"
        )


def current_device_info(index: int) -> DeviceInfo:
    """:class:`DeviceInfo` of CUDA device ``index`` and the installed torch build."""
    import torch

    return DeviceInfo(
        name=torch.cuda.get_device_name(index),
        capability=tuple(torch.cuda.get_device_capability(index)),  # type: ignore[arg-type]
        arch_list=tuple(torch.cuda.get_arch_list()),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
    )
