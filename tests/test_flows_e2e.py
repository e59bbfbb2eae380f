"""End to end with real parts: Prefect server, process work pool, deployments, a worker.

A Prefect server (SQLite, PREFECT_HOME in a temporary directory) on a loopback port;
``scripts/prefect-setup.sh`` creates the process work pool and runs ``prefect deploy --all``
from prefect.yaml; ``prefect deployment run pretrain/tiny`` (small data, a few steps, the
smoke suite) is executed by ``prefect worker start --run-once``; then the MLflow run, its eval
metrics and the Prefect artifacts are checked, and ``nightly-eval/default`` runs once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prod_stack import RAY_LEAN_ENV, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "clipops-process"


class Prefect:
    """A running Prefect server and the environment to reach it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        (tmp / "prefect").mkdir()
        self.env = {
            **os.environ,
            **RAY_LEAN_ENV,  # reaches the flow run's local Ray cluster
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_PORT": str(port),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "CLIPOPS_HOME": str(ROOT),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }
        self.log = (tmp / "server.log").open("w")
        self.server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={k: v for k, v in self.env.items() if k != "PREFECT_API_URL"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.server.poll() is None, (tmp / "server.log").read_text()[-3000:]
            time.sleep(1)
        raise AssertionError("Prefect server did not become healthy in 240 s")

    def run(self, *args: str, timeout: float = 300) -> str:
        """Run a command with the server's environment; fail with its output."""
        proc = subprocess.run(
            args,
            check=False,
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{args} -> {proc.returncode}\n{out[-4000:]}"
        return out

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST to the REST API; the JSON answer."""
        r = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.log.close()


@pytest.fixture
def prefect(tmp_path: Path) -> Iterator[Prefect]:
    server = Prefect(tmp_path)
    try:
        yield server
    finally:
        server.close()


def _run_deployment(p: Prefect, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``prefect deployment run NAME`` + one worker pass; the finished flow run."""
    out = p.run(str(BIN / "prefect"), "deployment", "run", name, "--params", json.dumps(params))
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    p.run(str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once", timeout=900)
    flow_run: dict[str, Any] = httpx.get(f"{p.api}/flow_runs/{run_id}", timeout=30).json()
    return flow_run


def _artifacts(p: Prefect, flow_run_id: str) -> dict[str, Any]:
    found = p.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found if a["key"]}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~6 min on a quiet 2-core machine, 15+ min when it is shared
def test_deployments_run_on_a_process_worker(prefect: Prefect, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    out = prefect.run("bash", str(ROOT / "scripts" / "prefect-setup.sh"), timeout=300)
    assert "pretrain/tiny" in out and "nightly-eval/default" in out, out[-3000:]
    deployments = prefect.post("/deployments/filter", {})
    assert {d["name"] for d in deployments} >= {"tiny", "vit-l14", "default", "adhoc"}

    flow_run = _run_deployment(
        prefect,
        "pretrain/tiny",
        {
            "source": "synthetic:train=512,test=64,seed=0,image_size=64",
            "suite": "configs/test-suite.yaml",
            "overrides": ["optim.max_steps=4", "checkpoint.every_steps=100"],
            "out_dir": str(tmp_path / "runs"),
            "run_name": "e2e",
        },
    )
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    arts = _artifacts(prefect, flow_run["id"])
    expected = {"pretrain-data", "pretrain-validation", "pretrain-training", "pretrain-eval"}
    expected |= {"pretrain-overlap", "pretrain-registry"}
    assert expected <= set(arts), sorted(arts)
    assert "| 576 | 576 | 0 | 0 |" in arts["pretrain-data"]["data"]
    assert "4 |" in arts["pretrain-training"]["data"]  # 4 optimiser steps
    logs = prefect.post(
        "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 200}
    )
    progress = [g["message"] for g in logs if g["message"].startswith("train step ")]
    assert progress and progress[-1].startswith("train step 4/4 (100%) epoch 1/1 loss "), progress
    assert " pairs/s " in progress[-1] and " ETA " in progress[-1]
    table = json.loads(arts["pretrain-eval"]["data"])
    assert {(r["dataset"], r["task"]) for r in table} == {
        ("synthetic-test", "zero_shot"),
        ("synthetic-test", "linear_probe"),
    }

    client = MlflowClient(prefect.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("clip-tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], "tags.`clipops.run_name` = 'e2e'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    top1 = metrics["eval/synthetic-test/zero_shot/top1"]
    assert 0.0 <= top1 <= 1.0
    assert "train/loss" in metrics
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id, "eval")} >= {
        "eval/results.jsonl",
        "eval/summary.md",
    }

    overlap = json.loads(arts["pretrain-overlap"]["data"])
    assert [r["dataset"] for r in overlap] and all(
        0 <= r["contamination (%)"] <= 100 for r in overlap
    )
    version = client.get_model_version_by_alias("clip-tiny-vit", "candidate")
    assert version.run_id == runs[0].info.run_id
    assert "candidate" in version.aliases and "champion" in version.aliases  # the first one
    assert f"version **{version.version}**" in arts["pretrain-registry"]["data"]

    nightly = _run_deployment(
        prefect,
        "nightly-eval/default",
        {"suite": "configs/test-suite.yaml", "out_dir": str(tmp_path / "nightly")},
    )
    assert nightly["state"]["type"] == "COMPLETED", nightly["state"]
    nightly_arts = _artifacts(prefect, nightly["id"])
    rows = json.loads(nightly_arts["nightly-eval"]["data"])
    assert [(r["model"], r["version"]) for r in rows] == [("clip-tiny-vit", str(version.version))]
    assert rows[0]["aliases"] == "candidate, champion"
    assert 0 <= rows[0]["synthetic-test/zero_shot"] <= 100
    exp_n = client.get_experiment_by_name("nightly-eval")
    assert exp_n is not None
    nightly_runs = client.search_runs([exp_n.experiment_id])
    assert len(nightly_runs) == 1
    assert "eval/synthetic-test/zero_shot/top1" in nightly_runs[0].data.metrics
