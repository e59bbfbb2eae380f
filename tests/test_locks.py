"""The three locks: one set of versions, differing only in torch's build and its CUDA runtime.

* ``requirements.lock``: torch's CPU build (``+cpu``, from /opt/wheels on these machines);
* ``requirements-cuda.lock``: PyPI's torch (the CUDA 13 build) and its ``nvidia-*``, ``cuda-*``
  and ``triton`` wheels, for A100/H100-class GPUs;
* ``requirements-v100.lock``: torch's ``+cu126`` build from PyTorch's index (the last builds with
  Volta kernels) and the CUDA 12.6 runtime wheels, derived by ``scripts/v100_lock.py``.

Everything else must be the same version in all three, and up to date with pyproject.toml as far
as that can be checked offline (every dependency locked, satisfied, and nothing left over that
names pyproject.toml as its reason). The derivation is re-run here on the committed CUDA lock.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "requirements.lock"
CUDA = ROOT / "requirements-cuda.lock"
V100 = ROOT / "requirements-v100.lock"
#: Names that may differ between the locks: CUDA runtime wheels and triton (nvidia-ml-py, the
#: pure-Python NVML binding, is an ordinary dependency in all three).
RUNTIME = re.compile(r"^(nvidia-(?!ml-py$)|cuda-|triton$)")
PYPROJECT_SOURCE = "clipops (pyproject.toml)"


def _lock(path: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, the names in its ``# via`` annotation), read independently of uv."""
    out: dict[str, tuple[str, set[str]]] = {}
    name = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        pin = re.match(r"^([A-Za-z0-9][\w.-]*)==(\S+)$", line)
        url = re.match(r"^([A-Za-z0-9][\w.-]*) @ \S+/[^/]+?-([^-/]+)-cp\d+-\S+\.whl$", line)
        if pin or url:
            found = pin or url
            assert found is not None
            name = canonicalize_name(found.group(1))
            out[name] = (found.group(2).replace("%2B", "+"), set())
        elif line.startswith("    #") and name:
            via = line.strip().lstrip("#").strip()
            via = via[3:].strip() if via == "via" or via.startswith("via ") else via
            if via:
                out[name][1].add(via)
        else:
            assert not line or line.startswith("#"), f"{path.name}: {line!r}"
    return out


def _versions(path: Path) -> dict[str, str]:
    return {name: version for name, (version, _) in _lock(path).items()}


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [Requirement(r) for r in wanted]


def _v100_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("v100_lock", ROOT / "scripts" / "v100_lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


# --------------------------------------------------------------------------- the torch builds


def test_each_lock_pins_its_torch_build_of_the_pyproject_version() -> None:
    (torch_pin,) = [r for r in _pyproject_requirements() if r.name == "torch"]
    (wanted,) = [s.version for s in torch_pin.specifier]
    builds = {path.name: Version(_versions(path)["torch"]) for path in (CPU, CUDA, V100)}
    assert {name: v.public for name, v in builds.items()} == dict.fromkeys(builds, wanted)
    assert builds["requirements.lock"].local == "cpu"
    assert builds["requirements-cuda.lock"].local is None  # PyPI's wheel: the CUDA 13 build
    assert builds["requirements-v100.lock"].local == "cu126"
    v100 = V100.read_text(encoding="utf-8")
    assert f"torch @ https://download.pytorch.org/whl/cu126/torch-{wanted}%2Bcu126-" in v100


def test_the_cuda_runtime_of_each_lock_is_its_own() -> None:
    cpu, cuda, v100 = (_versions(p) for p in (CPU, CUDA, V100))
    assert not [n for n in cpu if RUNTIME.match(n)]  # the CPU build pulls in no CUDA wheel
    for lock, major, suffix in ((cuda, "13", "cu13"), (v100, "12", "cu12")):
        nvidia = [n for n in lock if RUNTIME.match(n) and n.startswith("nvidia-")]
        assert len(nvidia) >= 12 and "nvidia-cudnn-" + suffix in nvidia, nvidia
        assert lock["cuda-toolkit"].split(".")[0] == major
        assert lock["cuda-bindings"].split(".")[0] == major
        other = "cu12" if suffix == "cu13" else "cu13"
        assert not [n for n in nvidia if n.endswith(other)], nvidia
    # CUDA 13 wheels are unsuffixed or -cu13; a V100 lock with one left over would load two cuBLAS
    assert all(n.endswith("-cu12") for n in v100 if n.startswith("nvidia-") and RUNTIME.match(n))
    assert v100["nvidia-cudnn-cu12"].startswith("9.10.2.")  # PyTorch's 2.13 matrix for 12.6
    assert cuda["triton"] == v100["triton"]


@pytest.mark.parametrize("other", [CUDA, V100], ids=lambda p: p.name)
def test_locks_differ_only_in_torch_and_the_cuda_runtime(other: Path) -> None:
    base, lock = _versions(CPU), _versions(other)
    only = set(base) ^ set(lock)
    assert only and all(RUNTIME.match(n) for n in only), sorted(only)
    shared = sorted(n for n in set(base) & set(lock) if n != "torch")
    assert len(shared) > 200
    differ = {n: (base[n], lock[n]) for n in shared if base[n] != lock[n]}
    assert differ == {}, differ
    assert base["nvidia-ml-py"] == lock["nvidia-ml-py"]  # pynvml: the same pure-Python wheel


def test_cuda_and_v100_share_every_version_but_the_cuda_runtime() -> None:
    cuda, v100 = _versions(CUDA), _versions(V100)
    differ = {n for n in set(cuda) | set(v100) if cuda.get(n) != v100.get(n)}
    assert "torch" in differ and "cuda-toolkit" in differ
    assert all(n == "torch" or RUNTIME.match(n) for n in differ), sorted(differ)


# --------------------------------------------------------------------------- pyproject.toml


@pytest.mark.parametrize("path", [CPU, CUDA, V100], ids=lambda p: p.name)
def test_every_pyproject_dependency_is_locked_and_satisfied(path: Path) -> None:
    lock = _lock(path)
    wanted = _pyproject_requirements()
    assert "nvidia-ml-py" in {canonicalize_name(r.name) for r in wanted}
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in lock, f"{path.name} lacks {req}: run ./dev lock"
        version = lock[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{path.name}: {name}=={version}"
    # the other way round: a dependency dropped from pyproject.toml leaves no package behind
    direct = {name for name, (_, via) in lock.items() if PYPROJECT_SOURCE in via}
    assert direct == {canonicalize_name(r.name) for r in wanted}


def test_lock_headers_name_the_command_that_made_them() -> None:
    for path in (CPU, CUDA, V100):
        assert "#    ./dev lock" in path.read_text(encoding="utf-8").splitlines()[:3], path.name


# --------------------------------------------------------------------------- the V100 derivation


def test_v100_lock_is_what_the_script_derives_from_the_cuda_lock() -> None:
    script = _v100_script()
    cuda_text, v100_text = CUDA.read_text(encoding="utf-8"), V100.read_text(encoding="utf-8")
    pins = script.runtime_pins(v100_text)
    assert set(pins) == {n for n in _versions(V100) if RUNTIME.match(n) and n != "triton"}
    assert script.derive(cuda_text, pins) == v100_text  # stale after ./dev lock otherwise
    # the requirements it resolved are the CUDA 12.6 ones, and the lock satisfies them
    locked = _versions(V100)
    for spec in script.CU126_REQUIRES:
        req = Requirement(spec)
        assert req.specifier.contains(locked[canonicalize_name(req.name)]), spec


SMALL_CUDA_LOCK = """\
# This file was autogenerated by uv via the following command:
#    ./dev lock
cuda-toolkit==13.0.3.0
    # via torch
filelock==4.3.1
    # via
    #   ray
    #   torch
nvidia-cublas==13.1.1.3
    # via cuda-toolkit
nvidia-ml-py==13.615.71
    # via clipops (pyproject.toml)
ray==2.60.0
    # via clipops (pyproject.toml)
sympy==1.14.0
    # via torch
torch==2.13.0
    # via clipops (pyproject.toml)
triton==3.7.1
    # via torch
"""
SMALL_CU126 = """\
cuda-toolkit==12.6.3
    # via torch
nvidia-cublas-cu12==12.6.4.1
    # via cuda-toolkit
"""


def test_derive_swaps_torch_and_the_runtime_and_keeps_the_rest() -> None:
    script = _v100_script()
    pins = script.parse_lock(SMALL_CU126)
    text = script.derive(SMALL_CUDA_LOCK, pins)
    entries = script.parse_lock(text)
    assert sorted(entries) == [
        "cuda-toolkit", "filelock", "nvidia-cublas-cu12", "nvidia-ml-py", "ray", "sympy",
        "torch", "triton",
    ]  # fmt: skip
    assert entries["cuda-toolkit"].line == "cuda-toolkit==12.6.3"
    assert entries["nvidia-ml-py"].line == "nvidia-ml-py==13.615.71"  # pulled in by pyproject
    assert entries["filelock"].notes == ("    # via", "    #   ray", "    #   torch")
    torch = entries["torch"]
    assert torch.line == (
        "torch @ https://download.pytorch.org/whl/cu126/"
        "torch-2.13.0%2Bcu126-cp311-cp311-manylinux_2_28_x86_64.whl"
    )
    assert script.version_of(torch) == "2.13.0+cu126"
    assert torch.notes == ("    # via clipops (pyproject.toml)",)
    assert text.startswith("# This file was generated by scripts/v100_lock.py")
    assert script.runtime_pins(text) == pins  # what the committed-lock check above relies on


def test_derive_refuses_a_local_torch_and_colliding_pins() -> None:
    script = _v100_script()
    with pytest.raises(ValueError, match="local build"):
        script.derive(SMALL_CUDA_LOCK.replace("torch==2.13.0", "torch==2.13.0+cpu"), {})
    with pytest.raises(ValueError, match="collide"):
        script.derive(SMALL_CUDA_LOCK, script.parse_lock("sympy==1.13.0\n    # via torch\n"))
    with pytest.raises(ValueError, match="unexpected lock line"):
        script.parse_lock("torch>=2\n")


def test_derived_wheel_name_follows_pytorchs_index_naming() -> None:
    """The CPU wheel in /opt/wheels came from PyTorch's index: the cu126 name is built alike."""
    wheels = sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl"))
    if not wheels:
        pytest.skip("no torch CPU wheel in /opt/wheels on this machine")
    script = _v100_script()
    version = _versions(CPU)["torch"].split("+")[0]
    derived = script.torch_wheel_url(version).rsplit("/", 1)[1].replace("%2B", "+")
    assert derived.replace("+cu126", "+cpu") in {w.name for w in wheels}


def test_dev_installs_each_lock_and_refuses_other_choices() -> None:
    dev = (ROOT / "dev").read_text(encoding="utf-8")
    assert "--cpu) lockfile=requirements.lock sources=(--find-links /opt/wheels) ;;" in dev
    for flag, lock in (("--cuda)", CUDA.name), ("--cuda=v100)", V100.name)):
        assert f"{flag} lockfile={lock} ;;" in dev  # no /opt/wheels for GPU installs
    done = subprocess.run(
        ["bash", str(ROOT / "dev"), "install", "--cuda=p100"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--cuda=v100" in done.stderr


def test_dev_install_without_a_choice_keeps_the_venvs_lock(tmp_path: Path) -> None:
    """`./dev test` on a CUDA venv must not fall back to the CPU lock (and /opt/wheels)."""
    (tmp_path / ".lock-choice").write_text("--cuda=p100\n", encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "CLIPOPS_VENV": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(ROOT / "dev"), "install"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "usage: ./dev install" in done.stderr  # it read the choice
    assert not (tmp_path / "bin").exists()  # refused before making a venv
