"""``dvc repro`` of dvc.yaml on a fresh copy: full run, no-op rerun, partial rerun.

The copy holds the pipeline files and the code directories its stages depend on, in a new
git + DVC repository; params.yaml is shrunk (small corpus, one epoch, the smoke suite) so a
real 2-worker Ray training keeps the test to a few minutes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prod_stack import RAY_LEAN_ENV

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CODE = ("clip_core", "clip_data", "clip_train", "clip_eval", "clip_overlap", "flows", "configs")


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
    for name in ("dvc.yaml", ".dvcignore"):
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
    metrics = json.loads((repo / "pipeline/reports/eval.json").read_text())
    assert 0.0 <= metrics["eval/synthetic-test/zero_shot/top1"] <= 1.0
    with (repo / "pipeline/reports/loss.csv").open() as f:
        loss = list(csv.DictReader(f))
    assert [int(r["step"]) for r in loss] == [1, 2, 3, 4]  # 256 rows / 64 per step, one epoch
    with (repo / "pipeline/reports/zeroshot_vs_probe.csv").open() as f:
        assert [r["dataset"] for r in csv.DictReader(f)] == ["synthetic-test"]
    overlap = json.loads((repo / "pipeline/overlap/overlap.json").read_text())
    assert set(overlap["datasets"]) and (repo / "pipeline/overlap/overlap.md").is_file()
    shown = _dvc(repo, "metrics", "show", "--json")
    assert "eval/synthetic-test/linear_probe/top1" in shown

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
