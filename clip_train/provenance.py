"""What makes a run reproducible: the seeds it sets and the code version it records."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Tracked files that are not code: DVC's pipeline state (``dvc repro`` rewrites it between
# stages) and its knobs (``dvc exp run -S`` edits them). A run records both itself (data
# version, resolved config), so changing them does not make the code version dirty.
NOT_CODE = frozenset({"dvc.lock", "params.yaml"})


def _changed_paths(porcelain: str) -> list[str]:
    """Paths of ``git status --porcelain`` lines (the new name of a rename)."""
    return [line[3:].split(" -> ")[-1].strip('"') for line in porcelain.splitlines() if line]


def code_version() -> str:
    """The git commit of the working tree (with '-dirty' if anything but :data:`NOT_CODE`
    differs from it, untracked files included), or 'unknown'."""
    here = Path(__file__).parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = [p for p in _changed_paths(status) if p not in NOT_CODE]
    return sha + ("-dirty" if dirty else "")
