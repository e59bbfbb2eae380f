"""The project's shape: the two README commands, CI, the CLI, and the required layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clip_cli.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def test_required_layout_exists() -> None:
    for name in ["clip_core", "flows", "infra", "tests", "bench"]:
        assert (ROOT / name).is_dir(), name
    for name in ["prefect.yaml", "pyproject.toml", "requirements.lock", "README.md", ".ci/run"]:
        assert (ROOT / name).is_file(), name


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.index("## Set-up")
    assert setup < readme.index("## Usage")
    block = re.search(r"```bash\n(.*?)```", readme[setup:], re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["./dev demo", "./dev test"]
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"^exec \./dev test$", ci, re.M), ci


def test_lock_pins_every_requirement() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(lines) > 100
    unpinned = [line for line in lines if "==" not in line]
    assert unpinned == []
    names = {line.split("==")[0].lower() for line in lines}
    for dep in ["torch", "tokenizers", "safetensors", "pillow", "numpy", "prefect", "ray"]:
        assert dep in names, dep
    for dep in ["mlflow", "dvc", "dvc-s3", "boto3", "great-expectations", "pyarrow", "s3fs"]:
        assert dep in names, dep


def test_prefect_yaml_parses() -> None:
    data = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert data["name"] == "clipops"
    assert isinstance(data["deployments"], list)


def test_help_lists_the_commands() -> None:
    help_text = build_parser().format_help()
    for command in ["models", "demo"]:
        assert command in help_text


def test_models_command_lists_configs_with_parameter_counts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ViT-B-32"]["parameters"] == 151_277_313
    assert rows["RN50"]["parameters"] == 102_007_137
    assert {"tiny-vit", "tiny-rn", "ViT-L-14-336", "RN50x64"} <= set(rows)


def test_console_script_runs() -> None:
    exe = Path(sys.executable).parent / "clipops"
    result = subprocess.run([str(exe), "models"], capture_output=True, text=True, check=True)
    assert "ViT-L-14" in result.stdout and "427,616,513" in result.stdout
    bad = subprocess.run([str(exe), "nonsense"], check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_the_ingest_side_starts_without_torch() -> None:
    """The ingest checks, sources and pool workers import no torch (2+ s per process)."""
    code = (
        "import sys, clip_data.checks, clip_data.ingest, clip_data.sources, "
        "clip_data.wds_ingest, clip_core.images, clip_core; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_clip_core_names_load_on_first_use() -> None:
    """Every public name of the package resolves, to the object its submodule defines."""
    import importlib

    import clip_core

    assert sorted(clip_core.__all__) == sorted(clip_core._EXPORTS)
    for name, module in clip_core._EXPORTS.items():
        assert getattr(clip_core, name) is getattr(importlib.import_module(module), name)
    assert set(clip_core.__all__) <= set(dir(clip_core))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = clip_core.nope
