"""A clean checkout stays clean after the project has run: every file it writes is ignored.

The outputs are created where the project puts them by default, with the paths read from
the sources that decide them (dvc.yaml's stages and plots, data.dvc, the CLI's and the
tracking module's defaults), in a new git repository holding this checkout's .gitignore
files. ``tests/test_dvc_pipeline.py`` (slow) also watches a real ``dvc repro`` leave only
``dvc.lock`` to commit and tag its training run with a clean code version.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from clip_cli.main import build_parser
from clip_train.tracking import DEFAULT_DB

ROOT = Path(__file__).resolve().parent.parent


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _dvc_paths() -> list[str]:
    """Every output, metric and plot path of dvc.yaml, and the data of data.dvc."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths: list[str] = []
    for stage in spec["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    paths += [next(iter(p)) if isinstance(p, dict) else p for p in spec.get("plots", [])]
    paths += [o["path"] for o in yaml.safe_load((ROOT / "data.dvc").read_text())["outs"]]
    return paths


def _demo_out() -> str:
    args = build_parser().parse_args(["demo"])
    return str(args.out)


def _written(paths: list[str]) -> list[str]:
    """Files standing for each output: a file path as it is, a folder with a file inside."""
    return [p if Path(p).suffix else f"{p}/part-0.bin" for p in paths]


def test_every_output_the_project_writes_is_ignored(tmp_path: Path) -> None:
    repo = tmp_path / "checkout"
    repo.mkdir()
    ignores = _git(ROOT, "ls-files", "*.gitignore", ".gitignore").split()
    assert ".gitignore" in ignores and "pipeline/.gitignore" in ignores, ignores
    for name in ignores:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes((ROOT / name).read_bytes())
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "ignores")

    outputs = [
        *_written(_dvc_paths()),
        f"{_demo_out()}/tiny/checkpoint_000001/model.safetensors",  # clipops demo, train
        "runs/tiny/final/config.json",  # infra.storage_path: runs
        DEFAULT_DB,  # tracking default sqlite:///./mlruns.db
        "mlartifacts/clip-tiny/0123/artifacts/eval/results.jsonl",
        "mlruns/0/meta.yaml",  # an MLflow file store
        ".prefect/prefect.db",  # PREFECT_HOME in the checkout
        "dvc_plots/index.html",  # dvc plots show
        ".dvc/tmp/lock",
        ".dvc/cache/files/md5/af/849957",
        "bench/results/gpu_check.json",
        "clip_core/__pycache__/model.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        ".coverage",
    ]
    assert "pipeline/metrics/eval" in _dvc_paths() and "pipeline/reports/loss.png" in _dvc_paths()
    for rel in outputs:
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    left = _git(repo, "status", "--porcelain", "--untracked-files=all")
    assert left == "", left
