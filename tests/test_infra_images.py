"""Container images: infra/images.yaml names them, every infra file uses exactly those names, and
each Dockerfile builds its image from the lock images.yaml says.

No docker engine here, so the Dockerfiles are checked structurally (the build itself has not
been run): their FROM lines with the build arguments applied, the lock copied and installed,
Python 3.11, a non-root USER, and what Ray needs in the CUDA image (``ray`` on PATH, bash, and
the tools KubeRay's probes and the cluster launcher use). The helpers of tests/test_infra.py
read the manifests.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_infra import (
    COMPOSE,
    GPU_GROUPS,
    INFRA,
    RAY_LAUNCHER,
    ROOT,
    _cluster_specs,
    _containers,
    _example_env,
    _interpolate,
    _load_yaml,
)

IMAGES = _load_yaml(INFRA / "images.yaml")
OWN: dict[str, dict[str, Any]] = IMAGES["clipops"]
ALLOWED = {entry["image"] for entry in OWN.values()} | set(IMAGES["third_party"])
#: The image of each GPU type's nodes: its torch build has kernels for that GPU.
IMAGE_FOR_GPU = {"V100": OWN["cuda-v100"]["image"], "A100": OWN["cuda"]["image"]}
IMAGE_KEYS = ("image", "head_image", "worker_image")
#: compose's ${VAR:?} variables: set to anything, the rest fall back to their defaults.
REQUIRED_VARS = ("POSTGRES_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN")
_REF = re.compile(r"(?<![\w./-])clipops:[A-Za-z0-9][\w.-]*")


def _image_refs(doc: Any, where: str) -> list[tuple[str, str]]:
    """(place, reference) of every image key anywhere in a parsed YAML/JSON document."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in IMAGE_KEYS and isinstance(value, str):
                found.append((f"{where}.{key}", value))
            else:
                found.extend(_image_refs(value, f"{where}.{key}"))
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            found.extend(_image_refs(item, f"{where}[{i}]"))
    return found


def _infra_documents() -> list[tuple[Path, Any]]:
    """Every YAML/JSON document of infra/ and the Prefect project file; compose interpolated."""
    paths = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    docs = []
    for path in [*paths, ROOT / "prefect.yaml"]:
        text = path.read_text(encoding="utf-8")
        if path == COMPOSE:  # both the defaults and the example env's values are in use
            required = dict.fromkeys(REQUIRED_VARS, "x")
            for env in (required, _example_env()):
                docs.append((path, yaml.safe_load(_interpolate(text, env))))
        elif path.suffix == ".json":
            docs.append((path, json.loads(text)))
        else:
            docs.extend((path, doc) for doc in yaml.safe_load_all(text))
    return docs


# --------------------------------------------------------------------------- the source of truth


def test_images_yaml_names_each_image_once_with_its_dockerfile_and_lock() -> None:
    names = [entry["image"] for entry in OWN.values()]
    assert len(set(names)) == len(names) == 3
    assert set(OWN) == {"cpu", "cuda", "cuda-v100"}
    for key, entry in OWN.items():
        assert (ROOT / entry["dockerfile"]).is_file(), key
        assert (ROOT / entry["lock"]).is_file(), key
        assert re.fullmatch(r"([\w.-]+(:\d+)?/)*[\w.-]+:[\w][\w.-]*", entry["image"]), key
    assert not ALLOWED & {"", "latest"}


def test_every_image_reference_in_infra_is_in_images_yaml() -> None:
    refs: list[tuple[str, str]] = []
    for path, doc in _infra_documents():
        if path.name != "images.yaml":
            where = str(path.relative_to(ROOT))
            refs.extend((f"{where}:{place}", ref) for place, ref in _image_refs(doc, ""))
    stray = [(place, ref) for place, ref in refs if ref not in ALLOWED]
    assert stray == []
    used = {ref for _, ref in refs}
    assert used == ALLOWED  # and nothing in images.yaml is dead
    assert sum(ref == OWN["cuda-v100"]["image"] for _, ref in refs) >= 4
    broken = _image_refs({"spec": [{"image": "clipops:latest-gpu"}]}, "")
    assert [r for _, r in broken if r not in ALLOWED] == ["clipops:latest-gpu"]  # the walk sees


def test_every_clipops_name_in_text_is_an_image_of_images_yaml() -> None:
    """Comments, build commands and docs too: a renamed image leaves no old name behind."""
    paths = [p for p in INFRA.rglob("*") if p.is_file() and p.suffix not in (".pyc",)]
    paths += [ROOT / "README.md", ROOT / "dev", *sorted((ROOT / "docs").rglob("*.md"))]
    seen = set()
    for path in paths:
        for ref in _REF.findall(path.read_text(encoding="utf-8")):
            assert ref in ALLOWED, f"{path.relative_to(ROOT)}: {ref}"
            seen.add(ref)
    assert {OWN["cuda"]["image"], OWN["cuda-v100"]["image"]} <= seen
    assert _REF.findall("image: clipops:latest-cuda  # x\nname: clipops\n") == [
        "clipops:latest-cuda"
    ]


# --------------------------------------------------------------------------- who runs which image


def test_gpu_nodes_run_the_image_whose_torch_has_their_kernels() -> None:
    checked = 0
    for name, spec in _cluster_specs():
        gpu_types = set()
        for group in spec["workerGroupSpecs"]:
            gpu = GPU_GROUPS[group["groupName"]]
            gpu_types.add(gpu)
            for container in group["template"]["spec"]["containers"]:
                assert container["image"] == IMAGE_FOR_GPU[gpu], f"{name}:{group['groupName']}"
                checked += 1
        heads = [c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
        # a cluster of one GPU type runs its driver on the same build as its workers
        want = IMAGE_FOR_GPU[gpu_types.pop()] if len(gpu_types) == 1 else OWN["cuda"]["image"]
        assert heads == [want], name
        assert all(c["image"] in ALLOWED for c in _containers(spec)), name
    assert checked >= 4
    launcher = _load_yaml(RAY_LAUNCHER)
    assert launcher["docker"]["image"] == OWN["cuda"]["image"]
    for node_type, gpu in GPU_GROUPS.items():
        node = launcher["available_node_types"][node_type]
        image = node.get("docker", {}).get("worker_image", launcher["docker"]["image"])
        assert image == IMAGE_FOR_GPU[gpu], node_type


def test_compose_runs_the_cpu_image_built_from_its_dockerfile() -> None:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    anchor = raw["x-clipops-image"]
    assert anchor["image"] == "${CLIPOPS_IMAGE:-" + OWN["cpu"]["image"] + "}"
    assert anchor["build"]["dockerfile"] == OWN["cpu"]["dockerfile"]
    assert (COMPOSE.parent / anchor["build"]["context"]).resolve() == ROOT
    assert _example_env()["CLIPOPS_IMAGE"] == OWN["cpu"]["image"]
    services = yaml.safe_load(_interpolate(COMPOSE.read_text(encoding="utf-8"), _example_env()))
    own = {n for n, s in services["services"].items() if s["image"] == OWN["cpu"]["image"]}
    assert own == {"mlflow", "ray-head", "ray-worker", "prefect-worker"}
    prefect = _lock_versions(ROOT / "requirements.lock")["prefect"]
    server = services["services"]["prefect-server"]["image"]
    assert server == f"prefecthq/prefect:{prefect}-python3.11"


# --------------------------------------------------------------------------- the Dockerfiles


def _lock_versions(path: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)$", path.read_text(encoding="utf-8"), re.M)
    return {name.lower(): version for name, version in pins}


def _instructions(path: Path, build_args: dict[str, str]) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of a Dockerfile, continuations joined, ARG values substituted."""
    joined, buf = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        joined.append(buf + line)
        buf = ""
    assert not buf, f"{path.name}: dangling continuation"
    values: dict[str, str] = {}
    out = []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            values[name] = build_args.get(name, default or values.get(name, ""))
        rest = re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), rest)
        out.append((keyword, rest))
    return out


def _final_stage(steps: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    last = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last][1].split()[0], steps[last + 1 :]


def _uv_version() -> str:
    match = re.search(r"^UV_VERSION=(\S+)", (ROOT / "dev").read_text(encoding="utf-8"), re.M)
    assert match is not None
    return match.group(1)


def test_each_dockerfile_declares_the_build_args_images_yaml_passes() -> None:
    for key, entry in OWN.items():
        steps = _instructions(ROOT / entry["dockerfile"], {})
        declared = {r.partition("=")[0] for k, r in steps if k == "ARG"}
        assert set(entry.get("build_args", {})) <= declared, key


def test_cpu_dockerfile_installs_the_cpu_lock_with_torch_from_pytorchs_cpu_index() -> None:
    entry = OWN["cpu"]
    base, steps = _final_stage(_instructions(ROOT / entry["dockerfile"], {}))
    assert base == "python:3.11-slim"
    copies = [r.split() for k, r in steps if k == "COPY"]
    assert [entry["lock"], "pyproject.toml", "./"] in copies
    run = " ".join(r for k, r in steps if k == "RUN")
    assert f'"uv=={_uv_version()}"' in run
    # torch alone from PyTorch's CPU index (the lock pins its +cpu build), the rest from PyPI
    assert f"grep '^torch==' {entry['lock']} >/tmp/torch.txt" in run
    assert f"grep -v '^torch==' {entry['lock']} >/tmp/rest.txt" in run
    assert "--index-url https://download.pytorch.org/whl/cpu -r /tmp/torch.txt" in run
    assert re.search(r"uv pip install --system --no-cache --no-deps -r /tmp/rest\.txt", run)
    assert "uv pip check --system" in run
    assert _lock_versions(ROOT / entry["lock"])["torch"].endswith("+cpu")


@pytest.mark.parametrize("key", ["cuda", "cuda-v100"])
def test_cuda_dockerfile_builds_its_image_from_its_lock(key: str) -> None:
    entry = OWN[key]
    steps = _instructions(ROOT / entry["dockerfile"], entry["build_args"])
    base, stage = _final_stage(steps)
    assert base == entry["base"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", base)
    assert match, base
    lock = _lock_versions(ROOT / entry["lock"])
    toolkit = lock["cuda-toolkit"].split(".")[:2]
    assert [match.group(1), match.group(2)] == toolkit  # the base's CUDA is the wheels' CUDA
    assert [r.split()[-1] for k, r in steps if k == "FROM" and " AS " in r] == ["uv"]
    assert f"ghcr.io/astral-sh/uv:{_uv_version()} AS uv" in [r for k, r in steps if k == "FROM"]
    copies = [r.split() for k, r in stage if k == "COPY"]
    assert [entry["lock"], "pyproject.toml", "./"] in copies
    runs = [r for k, r in stage if k == "RUN"]
    sync = f"uv pip sync --python /opt/venv/bin/python --compile-bytecode {entry['lock']}"
    assert any(sync in r for r in runs)
    assert any("uv pip check --python /opt/venv/bin/python" in r for r in runs)
    assert any("uv python install 3.11" in r and "--python 3.11 /opt/venv" in r for r in runs)
    envs = " ".join(r for k, r in stage if k == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in envs and "ray" in lock  # `ray` on PATH
    assert f"CLIPOPS_LOCK={entry['lock']}" in envs


def test_cuda_image_runs_as_a_non_root_user_with_what_ray_needs() -> None:
    stage = _final_stage(_instructions(ROOT / OWN["cuda"]["dockerfile"], {}))[1]
    users = [r for k, r in stage if k == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    run = " ".join(r for k, r in stage if k == "RUN")
    assert f"useradd --uid 1000 --gid users --create-home --shell /bin/bash {users[-1]}" in run
    # after USER nothing runs as root again; no ENTRYPOINT hides the commands Ray passes
    after = stage[max(i for i, (k, _) in enumerate(stage) if k == "USER") :]
    assert [k for k, _ in after if k == "RUN"] == []
    assert not [k for k, _ in stage if k == "ENTRYPOINT"]
    assert ("CMD", '["/bin/bash"]') in stage
    apt = next(r for k, r in stage if k == "RUN" and "apt-get install" in r)
    assert {"bash", "rsync", "wget", "openssh-client"} <= set(apt.split())
    assert "/etc/profile.d/clipops-venv.sh" in run  # login shells (bash -lc) keep the venv


def test_each_dockerfile_has_its_dockerignore() -> None:
    for key, entry in OWN.items():
        ignore = ROOT / (entry["dockerfile"] + ".dockerignore")
        lines = set(ignore.read_text(encoding="utf-8").splitlines())
        assert {".venv", ".git", "runs", "data"} <= lines, key


# --------------------------------------------------------------------------- the launcher's setup


def test_ray_launcher_setup_needs_nothing_the_image_lacks() -> None:
    """Setup commands run in the container: the token comes through boto3, not the AWS CLI."""
    import boto3
    from moto import mock_aws

    (command,) = _load_yaml(RAY_LAUNCHER)["setup_commands"]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"] and argv[3:] == [">", "~/.clipops-env"]
    assert not re.search(r"(^|[\s;(])aws\s", command)
    out = io.StringIO()
    with mock_aws():
        ssm = boto3.client("ssm", region_name="us-east-1")
        ssm.put_parameter(Name="/clipops/ray-auth-token", Value="t0ken", Type="SecureString")
        with contextlib.redirect_stdout(out):
            exec(compile(argv[2], "setup_commands[0]", "exec"), {})
    assert out.getvalue() == "export RAY_AUTH_TOKEN=t0ken\n"
