"""``dvc repro`` of dvc.yaml on a fresh copy: full run, no-op rerun, partial rerun.

The copy holds the pipeline files and the code directories its stages depend on, in a new
git + DVC repository; params.yaml is shrunk (small corpus, one epoch, the smoke suite) so a
real 2-worker Ray training keeps the test to a few minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prod_stack import RAY_LEAN_ENV

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CODE = (
    "clip_core",
    "clip_data",
    "clip_train",
    "clip_eval",
    "clip_overlap",
    "clip_registry",
    "flows",
    "configs",
)


def _dvc(repo: Path, *args: str, timeout: float = 900) -> str:
    env = {
        **os.environ,
        **RAY_LEAN_ENV,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlruns.db'}",
    }
    proc = subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dvc {args} -> {proc.returncode}\n{out[-5000:]}"
    return out


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in CODE:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    ignores = subprocess.run(
        ["git", "ls-files", "*.gitignore"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    ignores = [name for name in ignores if not name.startswith(".dvc/")]  # `dvc init` writes it
    for name in ("dvc.yaml", ".dvcignore", *ignores):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["source"] = "synthetic:train=256,test=32,seed=0,image_size=64"
    params["ingest"]["workers"] = 1
    params["train"].update(epochs=1, warmup_steps=1, global_batch_size=64, log_every=1)
    params["eval"]["suite"] = "configs/test-suite.yaml"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "pipeline")
    return repo


def _ran(out: str) -> set[str]:
    stages = ("ingest", "validate", "train", "overlap", "evaluate")
    return {s for s in stages if f"Running stage '{s}'" in out}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 1 Ray training, 2 evaluations: ~4 min quiet, ~9 min when shared
def test_repro_runs_all_then_nothing_then_only_what_a_param_touches(repo: Path) -> None:
    first = _dvc(repo, "repro")
    assert _ran(first) == {"ingest", "validate", "train", "overlap", "evaluate"}, first[-3000:]
    manifest = json.loads((repo / "pipeline/shards/manifest.json").read_text())
    assert manifest["counts"]["accepted"] == 288
    assert json.loads((repo / "pipeline/validated/validation.json").read_text())["success"]
    assert (repo / "pipeline/train/dvc-tiny/final/model.safetensors").is_file()
    zero_shot = json.loads((repo / "pipeline/metrics/eval/zero_shot_top1.json").read_text())
    assert set(zero_shot) == {"synthetic-test", "mean"} and 0.0 <= zero_shot["mean"] <= 1.0
    train = json.loads((repo / "pipeline/metrics/train.json").read_text())
    assert train["steps"] == 4 and train["final_loss"] > 0  # 256 rows / 64 per step, one epoch
    assert (repo / "pipeline/reports/loss.png").read_bytes()[:4] == b"\x89PNG"
    overlap = json.loads((repo / "pipeline/overlap/overlap.json").read_text())
    assert set(overlap["datasets"]) and (repo / "pipeline/overlap/overlap.md").is_file()
    contamination = json.loads((repo / "pipeline/metrics/overlap_contamination.json").read_text())
    assert set(contamination) <= {*overlap["datasets"], "max"}

    # `dvc metrics show`: a row per concern, a handful of columns (not one 62-column row)
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]
    assert {Path(f).name for f in files} >= {"train.json", "zero_shot_top1.json"}, files
    columns = {k for f in files.values() for k in f["data"]}
    assert 3 <= len(columns) <= 8, sorted(columns)
    # `dvc plots show`: image plots only, so the page needs nothing from the network
    _dvc(repo, "plots", "show", "-o", str(repo / "dvc_plots"))
    page = (repo / "dvc_plots" / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 3 and all((repo / "dvc_plots" / i).is_file() for i in images), images
    assert "<script" not in page and "http" not in page.lower(), page[:2000]
    # nothing to commit but the pipeline's lock: every output is ignored
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert status.splitlines() == ["?? dvc.lock"], status

    second = _dvc(repo, "repro")
    assert _ran(second) == set(), second[-3000:]
    assert "didn't change, skipping" in second

    # An eval knob: the two stages that read it rerun, the training (and all before it) not.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["threads"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = _dvc(repo, "repro")
    assert _ran(third) == {"overlap", "evaluate"}, third[-3000:]
    for stage in ("ingest", "validate", "train"):
        assert f"Stage '{stage}' didn't change" in third, third[-3000:]
    assert (repo / "pipeline/train/dvc-tiny/final/model.safetensors").is_file()
