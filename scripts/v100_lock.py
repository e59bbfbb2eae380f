"""Derive ``requirements-v100.lock`` (torch's CUDA 12.6 build, for V100 / sm_70) from the CUDA lock.

PyPI's Linux torch wheels are CUDA 13 builds, and neither they nor (since torch 2.11) the CUDA
12.8 builds carry Volta kernels; only the CUDA 12.6 builds on PyTorch's own wheel index do. That
index cannot be reached from the machines that compile the locks, so this lock is *derived*:

* every package of ``requirements-cuda.lock`` that is not part of torch's CUDA runtime is kept
  at the same version, with its annotations;
* the CUDA 13 runtime wheels (``nvidia-*``/``cuda-*`` that only torch pulls in) are dropped;
* :data:`CU126_REQUIRES`, the CUDA requirements of the ``+cu126`` wheel as PyTorch's build matrix
  lists them, is resolved from PyPI (where every one of those wheels is published) with uv;
* torch itself is pinned by a direct URL to the ``+cu126`` wheel on PyTorch's index, so a plain
  ``uv pip sync`` (or ``pip install -r``) takes torch from there and everything else from PyPI.

What is not verified here: that the ``+cu126`` wheel's own metadata lists exactly
:data:`CU126_REQUIRES` (and the CUDA lock's triton), and the wheel's file name. ``./dev install
--cuda=v100`` runs ``uv pip check`` after syncing, which compares the installed wheel's metadata
with what was installed.

    python scripts/v100_lock.py --uv .venv/bin/uv          # resolve (PyPI) and write the lock
    python scripts/v100_lock.py --cu126-pins FILE          # offline: pins from a uv output file
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_LOCK = ROOT / "requirements-cuda.lock"
V100_LOCK = ROOT / "requirements-v100.lock"

#: PyTorch's wheel index for the CUDA 12.6 builds, and the build's local version label.
TORCH_INDEX = "https://download.pytorch.org/whl/cu126"
LOCAL = "cu126"
#: The only Python the project supports (pyproject: requires-python ~3.11).
PYTHON_TAG = "cp311"
PLATFORM_TAG = "manylinux_2_28_x86_64"

#: Requires-Dist of torch 2.13's ``+cu126`` wheel on Linux, beyond what every build needs
#: (filelock, sympy, triton...): PyTorch's binary build matrix, PYTORCH_EXTRA_INSTALL_REQUIREMENTS
#: for CUDA 12.6 (cuDNN 9.10.2.21 and NCCL 2.29.3 as RELEASE.md lists them for 2.13).
CU126_REQUIRES = (
    "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]"
    "==12.6.3",
    "cuda-bindings>=12.9.4,<13",
    "nvidia-cudnn-cu12==9.10.2.21",
    "nvidia-cusparselt-cu12==0.7.1",
    "nvidia-nccl-cu12==2.29.3",
    "nvidia-nvshmem-cu12==3.4.5",
)

#: Names of CUDA runtime wheels (dropped from the CUDA lock when only torch's closure needs them).
_RUNTIME = re.compile(r"^(nvidia-|cuda-)")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
_URL = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*) @ (\S+)$")


@dataclass(frozen=True)
class Entry:
    """One package of a uv lock: its pin line and the ``# via`` lines below it."""

    name: str
    line: str
    notes: tuple[str, ...]

    @property
    def parents(self) -> frozenset[str]:
        """The names in the ``# via`` annotation (``-r``/pyproject sources as written)."""
        found = []
        for note in self.notes:
            text = note.strip().lstrip("#").strip()
            if text == "via" or text.startswith("via "):
                text = text[3:].strip()
            if text:
                found.append(text)
        return frozenset(found)


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, Entry]:
    """The packages of a uv ``pip compile`` output, by normalized name (comments skipped)."""
    entries: dict[str, Entry] = {}
    current: tuple[str, str] | None = None
    notes: list[str] = []

    def flush() -> None:
        if current is not None:
            entries[current[0]] = Entry(current[0], current[1], tuple(notes))

    for raw in text.splitlines():
        line = raw.rstrip()
        match = _PIN.match(line) or _URL.match(line)
        if match:
            flush()
            current, notes = (normalize(match.group(1)), line), []
        elif current is not None and line.startswith("    #"):
            notes.append(line)
        elif line and not line.startswith("#"):
            raise ValueError(f"unexpected lock line: {line!r}")
    flush()
    return entries


def version_of(entry: Entry) -> str:
    """The pinned version of an entry (``name==v``, or a wheel URL's version field)."""
    match = _PIN.match(entry.line)
    if match:
        return match.group(2)
    url = _URL.match(entry.line)
    if url is None:
        raise ValueError(entry.line)
    return url.group(2).rsplit("/", 1)[-1].split("-")[1].replace("%2B", "+")


def cuda_runtime(entries: dict[str, Entry]) -> set[str]:
    """The CUDA runtime wheels that only torch (or other runtime wheels) pull in."""
    runtime: set[str] = set()
    grew = True
    while grew:
        grew = False
        for name, entry in entries.items():
            if name in runtime or not _RUNTIME.match(name):
                continue
            if entry.parents and entry.parents <= {"torch"} | runtime:
                runtime.add(name)
                grew = True
    return runtime


def torch_wheel_url(version: str) -> str:
    """The ``+cu126`` wheel of torch ``version`` on PyTorch's index (the file name is derived)."""
    return f"{TORCH_INDEX}/torch-{version}%2B{LOCAL}-{PYTHON_TAG}-{PYTHON_TAG}-{PLATFORM_TAG}.whl"


def header(version: str) -> str:
    """The comment block at the top of the V100 lock."""
    return "\n".join(
        [
            "# This file was generated by scripts/v100_lock.py from requirements-cuda.lock:",
            "#    ./dev lock",
            f"# V100 (sm_70): torch {version}+{LOCAL} from PyTorch's CUDA 12.6 index, its CUDA",
            "# 12.6 runtime wheels from PyPI, every other package as in requirements-cuda.lock.",
            "# DERIVED, not resolved against the +cu126 wheel itself (unreachable where locks are",
            "# compiled): its CUDA requirements come from PyTorch's build matrix. `./dev install",
            "# --cuda=v100` runs `uv pip check` after syncing (docs/training.md, GPU install).",
        ]
    )


def derive(cuda_lock: str, cu126: dict[str, Entry]) -> str:
    """The V100 lock's text from the CUDA lock's text and the resolved CUDA 12.6 runtime set."""
    entries = parse_lock(cuda_lock)
    if "torch" not in entries:
        raise ValueError("the CUDA lock pins no torch")
    version = version_of(entries["torch"])
    if "+" in version:
        raise ValueError(f"the CUDA lock's torch is a local build ({version}), not PyPI's")
    drop = cuda_runtime(entries)
    kept = {n: e for n, e in entries.items() if n not in drop and n != "torch"}
    clash = sorted(set(kept) & set(cu126))
    if clash:
        raise ValueError(f"CUDA 12.6 pins collide with kept packages: {clash}")
    torch_notes = entries["torch"].notes
    merged = {
        **kept,
        **cu126,
        "torch": Entry("torch", f"torch @ {torch_wheel_url(version)}", torch_notes),
    }
    body = []
    for name in sorted(merged):
        body.append(merged[name].line)
        body.extend(merged[name].notes)
    return header(version) + "\n" + "\n".join(body) + "\n"


def runtime_pins(text: str) -> dict[str, Entry]:
    """The CUDA runtime entries of a lock: those of an existing V100 lock, say."""
    entries = parse_lock(text)
    return {name: entries[name] for name in sorted(cuda_runtime(entries))}


def resolve_cu126(uv: str, cuda_lock: str, previous: str | None) -> dict[str, Entry]:
    """Resolve :data:`CU126_REQUIRES` from PyPI with uv, the CUDA lock's other pins as constraints.

    The previous V100 lock's runtime pins are given to uv as preferences, so re-running
    ``./dev lock`` keeps them unless the requirements change.
    """
    found = shutil.which(uv)
    if found is None:
        raise SystemExit(f"no uv at {uv!r}")
    uv = str(Path(found).resolve())  # the compile runs in a temporary folder
    entries = parse_lock(cuda_lock)
    drop = cuda_runtime(entries) | {"torch"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "cu126.in").write_text("\n".join(CU126_REQUIRES) + "\n", encoding="utf-8")
        constraints = [e.line for n, e in sorted(entries.items()) if n not in drop]
        (folder / "constraints.txt").write_text("\n".join(constraints) + "\n", encoding="utf-8")
        out = folder / "cu126.txt"
        if previous is not None:
            out.write_text("\n".join(e.line for e in runtime_pins(previous).values()) + "\n")
        cmd = [
            uv, "pip", "compile", "cu126.in", "-c", "constraints.txt", "--python-version", "3.11",
            "--python-platform", "x86_64-manylinux_2_28", "--no-header", "-o", "cu126.txt",
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=folder, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"uv could not resolve the CUDA 12.6 set:\n{done.stderr}")
        text = out.read_text(encoding="utf-8").replace("-r cu126.in", "torch")
    return parse_lock(text)


def main(argv: list[str] | None = None) -> int:
    """Write the V100 lock; ``--check`` only compares it with what would be written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uv", default=str(ROOT / ".venv" / "bin" / "uv"), help="uv to run")
    parser.add_argument("--cu126-pins", type=Path, help="take the CUDA 12.6 set from this file")
    parser.add_argument("--cuda-lock", type=Path, default=CUDA_LOCK)
    parser.add_argument("-o", "--output", type=Path, default=V100_LOCK)
    parser.add_argument("--check", action="store_true", help="exit 1 if the lock is stale")
    args = parser.parse_args(argv)
    cuda_lock = args.cuda_lock.read_text(encoding="utf-8")
    previous = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    if args.cu126_pins is not None:
        cu126 = runtime_pins(args.cu126_pins.read_text(encoding="utf-8"))
    else:
        cu126 = resolve_cu126(args.uv, cuda_lock, previous)
    text = derive(cuda_lock, cu126)
    if args.check:
        if text != previous:
            print(f"{args.output} is not what {args.cuda_lock} gives: run ./dev lock")
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
