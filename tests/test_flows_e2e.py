"""End to end with real parts: Prefect server, process work pool, deployments, a worker.

A Prefect server (SQLite, PREFECT_HOME in a temporary directory) on a loopback port, started
as operators start it (``scripts/prefect-server.sh``: infra/prefect/server.env's settings);
``scripts/prefect-setup.sh`` creates the process work pool and runs ``prefect deploy --all``
from prefect.yaml; ``prefect deployment run pretrain/tiny`` (small data, a few steps, the
test suite) is executed by ``prefect worker start --run-once``; then the MLflow run, its eval
metrics and the Prefect artifacts are checked. The nightly deployment is not run by hand: it
is redeployed (``prefect deploy`` of an edited prefect.yaml) with a schedule due in 30 s, and
the test watches the server's scheduler create the flow run and a long-running worker execute
it; the server log must hold no traceback
(Prefect 3.8.8's scheduler failed on every loop with SQLAlchemy 2.1). Bad deployment runs
(an unknown parameter, a config error, missing shards, a stopped MLflow server) fail at once
with their reason in ``--watch``'s output, without retries and without a registered version.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow_sections import ui_sections
from prod_stack import PREFECT_SERVER_SCRIPT, RAY_LEAN_ENV, free_port, stop_group

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "clipops-process"
NIGHTLY = "nightly-eval/default"


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
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # the background worker polls every 2 s
            "PREFECT": str(BIN / "prefect"),
            "COLUMNS": "1000",  # the CLI's rich console: one reason, one line
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "CLIPOPS_HOME": str(ROOT),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }
        self.log = (tmp / "server.log").open("w")
        self.server = subprocess.Popen(
            ["bash", str(PREFECT_SERVER_SCRIPT), "--host", "127.0.0.1", "--port", str(port)],
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

    def run(self, *args: str, timeout: float = 300, ok: bool = True) -> str:
        """Run a command with the server's environment; fail with its output unless it
        exits as ``ok`` says (0, or not 0)."""
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
        assert (proc.returncode == 0) == ok, f"{args} -> {proc.returncode}\n{out[-4000:]}"
        return out

    def get(self, path: str) -> Any:
        """GET from the REST API; the JSON answer."""
        r = httpx.get(f"{self.api}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    @contextmanager
    def worker(self) -> Iterator[None]:
        """A long-running process worker of the pool (as an operator runs one)."""
        log = (self.tmp / "worker.log").open("a")
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield
        finally:
            stop_group(proc)
            log.close()

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


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefect]:
    server = Prefect(tmp_path_factory.mktemp("e2e"))
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
    top1 = metrics["transfer/synthetic-test/zero_shot/top1"]
    assert 0.0 <= top1 <= 1.0
    assert "train/loss" in metrics
    sections = ui_sections(metrics)  # the run page lists the training curves first
    assert sections[0] == "train" and len(sections) > 1, sections
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

    _nightly_fires_on_schedule(prefect, tmp_path, client, version.version, runs[0].info.run_id)


def _schedule_soon(p: Prefect, params: dict[str, Any]) -> dt.datetime:
    """Redeploy the nightly deployment as an operator would (``prefect deploy`` of an edited
    prefect.yaml) with one more schedule: hourly, first run due in 30 s; its first start."""
    import yaml

    start = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=30)
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    nightly = next(d for d in project["deployments"] if d["name"] == NIGHTLY.split("/")[1])
    soon = {"interval": 3600, "anchor_date": start.isoformat(), "parameters": params}
    nightly["schedules"] = [*nightly["schedules"], soon]
    edited = p.tmp / "prefect.yaml"
    edited.write_text(yaml.safe_dump(project, sort_keys=False))
    p.run(
        str(BIN / "prefect"),
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(edited),
        "--name",
        NIGHTLY,
    )
    return start


def _wait_for_run(p: Prefect, flow_run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run: dict[str, Any] = p.get(f"/flow_runs/{flow_run_id}")
        if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")


def _scheduled_runs(p: Prefect, deployment_id: str) -> list[dict[str, Any]]:
    body = {
        "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
        "sort": "EXPECTED_START_TIME_ASC",
    }
    return [r for r in p.post("/flow_runs/filter", body) if r["auto_scheduled"]]


def _nightly_fires_on_schedule(
    p: Prefect, tmp_path: Path, client: Any, version: str, training_run: str
) -> None:
    """The scheduler creates the nightly run; a worker runs it; the guide's commands show it."""
    start = _schedule_soon(p, {"out_dir": str(tmp_path / "nightly")})
    deployment = p.get(f"/deployments/name/{NIGHTLY}")
    deadline = time.time() + 60
    soon: list[dict[str, Any]] = []
    while time.time() < deadline and not soon:  # the scheduler's own loop, nothing triggered
        soon = [
            r
            for r in _scheduled_runs(p, deployment["id"])
            if dt.datetime.fromisoformat(r["expected_start_time"]) <= start
        ]
        time.sleep(1)
    server_log = (p.tmp / "server.log").read_text()
    every = [
        (r["expected_start_time"], r["state"]["type"]) for r in _scheduled_runs(p, deployment["id"])
    ]
    assert soon, f"no run due by {start} in 60 s: {every}; server log:\n{server_log[-3000:]}"
    assert soon[0]["state"]["type"] == "SCHEDULED" and soon[0]["auto_scheduled"]
    assert soon[0]["parameters"] == {"out_dir": str(tmp_path / "nightly")}

    # the commands docs/guides/nightly.md gives: the schedules, and the next runs
    listed = p.run(str(BIN / "prefect"), "deployment", "schedule", "ls", NIGHTLY)
    assert "interval: 1:00:00" in listed, listed
    assert "0 2 * * *" in listed, listed  # prefect.yaml's nightly cron
    upcoming = p.run(
        str(BIN / "prefect"),
        "flow-run",
        "ls",
        "--flow-name",
        "nightly-eval",
        "--state",
        "Scheduled",
    )
    assert soon[0]["name"] in upcoming, upcoming

    with p.worker():
        nightly = _wait_for_run(p, soon[0]["id"], timeout=900)
    assert nightly["state"]["type"] == "COMPLETED", nightly["state"]
    server_log = (p.tmp / "server.log").read_text()
    assert "Traceback" not in server_log, server_log[-4000:]

    nightly_arts = _artifacts(p, nightly["id"])
    rows = json.loads(nightly_arts["nightly-eval"]["data"])
    assert [(r["model"], r["version"]) for r in rows] == [("clip-tiny-vit", str(version))]
    assert rows[0]["aliases"] == "candidate, champion"
    assert 0 <= rows[0]["synthetic-test/zero_shot"] <= 100
    exp_n = client.get_experiment_by_name("nightly-eval")
    assert exp_n is not None
    nightly_runs = client.search_runs([exp_n.experiment_id])
    assert len(nightly_runs) == 1
    tags = nightly_runs[0].data.tags
    assert tags["clipops.training_run"] == training_run
    assert tags["clipops.suite"] == "smoke"  # the model's registered suite, not a parameter
    assert "transfer/synthetic-test/zero_shot/top1" in nightly_runs[0].data.metrics


def _watch(p: Prefect, name: str, params: dict[str, Any]) -> tuple[str, dict[str, Any], float]:
    """``prefect deployment run NAME --watch`` (must fail): its output, the run, seconds."""
    started = time.time()
    out = p.run(
        str(BIN / "prefect"),
        "deployment",
        "run",
        name,
        "--params",
        json.dumps(params),
        "--watch",
        "--watch-timeout",
        "300",
        timeout=400,
        ok=False,
    )
    seconds = time.time() - started
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    return out, p.get(f"/flow_runs/{run_id}"), seconds


def _task_states(p: Prefect, flow_run_id: str) -> list[str]:
    runs = p.post("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})
    return sorted(f"{t['name']}:{t['state']['name']}:{t['run_count']}" for t in runs)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bad_deployment_runs_fail_at_once_with_their_reason(
    prefect: Prefect, tmp_path: Path
) -> None:
    """After the main test (same server): each bad run fails fast, says why, is not retried."""
    from mlflow.tracking import MlflowClient

    if not prefect.post("/deployments/filter", {}):
        prefect.run("bash", str(ROOT / "scripts" / "prefect-setup.sh"), timeout=300)
    client = MlflowClient(prefect.env["MLFLOW_TRACKING_URI"])
    versions_before = len(client.search_model_versions("name = 'clip-tiny-vit'"))
    base = {
        "source": "synthetic:train=64,test=16,seed=0,image_size=64",
        "suite": "configs/test-suite.yaml",
        "out_dir": str(tmp_path / "runs"),
    }

    # a parameter the flow does not have: refused before a run exists
    out = prefect.run(
        str(BIN / "prefect"),
        "deployment",
        "run",
        "pretrain/tiny",
        "--param",
        "num_wokers=2",
        ok=False,
    )
    assert "num_wokers" in out, out[-2000:]

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cases: list[tuple[dict[str, Any], str]] = [
        ({**base, "overrides": ["optim.nope=1"]}, "unknown key(s) ['nope']"),
        ({**base, "source": None, "shards": str(tmp_path / "none")}, "is not a directory"),
        ({**base, "tracking_uri": dead}, dead),
    ]
    with prefect.worker():
        for params, reason in cases:
            out, run, seconds = _watch(prefect, "pretrain/tiny", params)
            assert run["state"]["type"] == "FAILED", run["state"]
            assert reason in run["state"]["message"], run["state"]
            assert "\n" not in run["state"]["message"].strip()
            assert reason in out, out[-3000:]  # --watch shows the reason, not only "Failed"
            states = _task_states(prefect, run["id"])
            assert not states, states  # failed before ingest: no task ran, none retried
            assert seconds < 120, seconds  # the worker starts the run, then it fails at once
        out, run, seconds = _watch(prefect, NIGHTLY, {"tracking_uri": dead})
        assert run["state"]["type"] == "FAILED" and dead in run["state"]["message"], run
        assert all(s.endswith(":1") for s in _task_states(prefect, run["id"]))  # no retry
        assert seconds < 120, seconds
    assert len(client.search_model_versions("name = 'clip-tiny-vit'")) == versions_before
