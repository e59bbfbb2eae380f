"""clip_train.provenance.code_version: the commit, '-dirty' only when code differs from it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from clip_train import provenance


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository holding a copy of the provenance module, imported from there."""
    root = tmp_path / "repo"
    (root / "clip_train").mkdir(parents=True)
    shutil.copy(provenance.__file__, root / "clip_train" / "provenance.py")
    (root / "params.yaml").write_text("train: {lr: 0.1}\n")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "x")
    monkeypatch.setattr(provenance, "__file__", str(root / "clip_train" / "provenance.py"))
    return root


def test_clean_tree_is_the_commit(repo: Path) -> None:
    sha = _git(repo, "rev-parse", "HEAD").strip()
    assert provenance.code_version() == sha


def test_pipeline_state_and_knobs_are_not_code(repo: Path) -> None:
    """``dvc repro`` rewrites dvc.lock between stages; ``dvc exp run -S`` edits params.yaml."""
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "params.yaml").write_text("train: {lr: 0.2}\n")
    assert not provenance.code_version().endswith("-dirty")


@pytest.mark.parametrize("change", ["edit", "untracked"])
def test_a_code_change_is_dirty(repo: Path, change: str) -> None:
    if change == "edit":
        with (repo / "clip_train" / "provenance.py").open("a") as f:
            f.write("# changed\n")
    else:
        (repo / "clip_train" / "new_module.py").write_text("x = 1\n")
    assert provenance.code_version().endswith("-dirty")


def test_outside_git_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "provenance.py"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.code_version() == "unknown"
