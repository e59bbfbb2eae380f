"""What every benchmark script shares: the machine it ran on, the load, argument checks."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from clip_core.registry import get_model_config


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def logical_cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 0


def machine_info() -> dict[str, Any]:
    """Environment the numbers were measured in."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "logical_cpus": logical_cpus(),
        "python": platform.python_version(),
        "dtype": "float32",
        "device": "cpu",
    }


def load_average() -> list[str]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    return Path("/proc/loadavg").read_text().split()[:3]


def machine_line(info: dict[str, Any], load: list[str] | None = None) -> str:
    """One header line naming torch, threads, CPU and date (and the load, when given)."""
    line = (
        f"torch {info['torch']} | threads {info['threads']} | CPU {info['cpu']} "
        f"({info['logical_cpus']} logical) | {info['date']}"
    )
    return line if load is None else f"{line} | load {' '.join(load)}"


def check_args(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    positive: Iterable[str] = ("batch", "steps", "threads"),
    models: Iterable[str] = (),
) -> None:
    """``p.error`` (exit 2) unless every option in ``positive`` that is set is >= 1 and every
    name in ``models`` is a registered model config."""
    for opt in positive:
        value = getattr(args, opt)
        if value is not None and value < 1:
            p.error(f"--{opt} must be at least 1")
    for name in models:
        try:
            get_model_config(name)
        except KeyError as exc:
            p.error(str(exc))
