"""The production-like stack end to end, with real services on loopback.

PostgreSQL 15 (Debian's binaries, a fresh data directory) backs an ``mlflow server`` whose
artifacts go to S3 (moto's HTTP endpoint) through the server (proxied artifacts). On that
stack: a dataset is pushed to and pulled from a DVC S3 remote, ingested to S3; a driver
without the Ray cluster's token is refused (exit 2, one line); a tiny-recipe training joins
the existing token-auth cluster (``ray start --head``), reads its shards from S3 and writes
its Ray run storage (checkpoints, final model) to S3 and its MLflow run to the server; the
model is registered (``clipops register``), loaded back from the registry and embeds a text.

The training runs the way a team runs it: a Prefect server on the same PostgreSQL, the
``clipops-ray`` work pool created from ``infra/prefect/ray-work-pool.json``, the
``pretrain/vit-b32-cluster`` deployment from ``infra/prefect/deployments.yaml`` (parameters
overridden to the tiny recipe on CPUs), the Ray address and tracking URI given as the pool's
job variables, and one pass of ``prefect worker start --pool clipops-ray`` runs the flow
(train, then the smoke eval suite logged to the same MLflow run).

Credentials: every process that needs S3 gets a recognisable fake secret key in its
environment (moto accepts any key), the database password is another one. Neither may appear
in any output: the processes' stdout/stderr, the server logs, the files under the test's
directories (Ray's session logs included), every object in the bucket (MLflow artifacts, Ray
checkpoints), MLflow params, tags and descriptions, the database files. Clients of the
tracking server (registration, loading the model) run without any S3 credentials.

Nothing is left running: the test checks that no process mentions its temporary directories
or the server's port after the stack is torn down.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from prod_stack import (
    files_containing,
    mlflow_server,
    postgres,
    prefect_server,
    processes_mentioning,
    ray_head,
)

from clip_data.versioning import dvc, dvc_md5, recorded_md5, write_demo_raw

# ~5 min on an idle 2-core machine (6.5 min with 3 other jobs); 12 min seen when shared
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

BUCKET = "clipops-prod"
S3_SECRET = f"FAKE-S3-SECRET-{secrets.token_hex(8)}"  # recognisable, unique to this run
PG_PASSWORD = f"FAKE-PG-PASSWORD-{secrets.token_hex(8)}"
RAY_TOKEN = secrets.token_hex(32)  # the Ray cluster's token: a credential too
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN}
ACCESS_KEY = "AKIACLIPOPSTEST"
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
PATH = f"{BIN}:{os.environ.get('PATH', '')}"  # the flow-run process's python is this venv's
# Tracking clients download proxied artifacts through the server, not by presigned S3 URLs:
# MLflow's S3 store uploads ``*.gz`` files with ``Content-Encoding: gzip`` and the presigned
# ranged download of such a file (the checkpoint's bpe_merges.txt.gz) never matches its size.
CLIENT_ENV = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


class Outputs:
    """Every text the stack produced, by label, for the credentials search.

    Subprocess output goes to files under ``logs`` (watchable while a step runs; searched
    with every other file afterwards) and is kept by label.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.texts: dict[str, str] = {}

    def run(
        self, label: str, cmd: list[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd``; keep its stdout/stderr; fail the test (with its stderr) on exit != 0."""
        self.logs.mkdir(parents=True, exist_ok=True)
        stem = self.logs / f"{len(self.texts) // 2:02d}-{label.replace(' ', '-')}"
        out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with out_path.open("w") as out, err_path.open("w") as err:
            code = subprocess.run(
                cmd, env=dict(env), cwd=cwd, stdout=out, stderr=err, timeout=600, check=False
            ).returncode
        stdout = out_path.read_text(errors="replace")
        stderr = err_path.read_text(errors="replace")
        self.texts[f"{label} stdout"] = stdout
        self.texts[f"{label} stderr"] = stderr
        assert code == 0, f"{label} exited {code}:\n{stderr[-3000:]}"
        return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def _base_env(home: Path) -> dict[str, str]:
    """The inherited environment minus any AWS settings, plus isolated config locations."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    empty = home / "aws-empty"
    empty.write_text("", encoding="utf-8")
    env.update(
        AWS_CONFIG_FILE=str(empty),
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_EC2_METADATA_DISABLED="true",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
    )
    return env


def _s3_env(base: Mapping[str, str], endpoint: str) -> dict[str, str]:
    """``base`` plus the S3 endpoint and the (fake) credentials, as a cluster node gets them."""
    return {
        **base,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


def _bucket_keys(client: Any, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _dataset_via_dvc(out: Outputs, env: Mapping[str, str], endpoint: str, root: Path) -> Path:
    """Push a raw dataset to a DVC S3 remote from one repository, pull it into a fresh clone.

    Returns the clone's ``data/raw`` (pulled from S3). Credentials come from the environment
    only: no DVC config file holds them.
    """
    origin = root / "origin"
    origin.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    out.run("git init", [*git, "init", "-q", str(origin)], env)
    dvc("init", "-q", cwd=origin, env=env)
    write_demo_raw(origin / "data" / "raw", train=128, test=16, seed=5)
    dvc("add", "data", cwd=origin, env=env)
    dvc("remote", "add", "-d", "s3", f"s3://{BUCKET}/dvcstore", cwd=origin, env=env)
    dvc("remote", "modify", "s3", "endpointurl", endpoint, cwd=origin, env=env)
    out.run("git commit", [*git, "add", "data.dvc", ".gitignore", ".dvc"], env, cwd=origin)
    out.run("git commit", [*git, "commit", "-q", "-m", "data"], env, cwd=origin)
    out.texts["dvc push"] = dvc("push", cwd=origin, env=env).stdout
    clone = root / "clone"
    out.run("git clone", [*git, "clone", "-q", str(origin), str(clone)], env)
    assert not (clone / "data").exists()
    pulled = dvc("pull", cwd=clone, env=env)
    out.texts["dvc pull"] = pulled.stdout + pulled.stderr
    assert dvc_md5(clone / "data") == recorded_md5(origin / "data.dvc")
    for name in ("config", "config.local"):
        config = clone / ".dvc" / name
        assert not config.exists() or S3_SECRET not in config.read_text(encoding="utf-8")
    return clone / "data" / "raw"


def _train_without_token(out: Outputs, env: Mapping[str, str], cluster: str) -> None:
    """A driver without the cluster's token: exit 2 and one line naming RAY_AUTH_TOKEN."""
    settings = [f"infra.ray_address={cluster}", f"data.shards=s3://{BUCKET}/shards"]
    cmd = [str(BIN / "clipops"), "train", "--config", "tiny", *[f"--set={s}" for s in settings]]
    denied = subprocess.run(
        cmd,
        env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")},
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )
    out.texts["train without token stdout"] = denied.stdout
    out.texts["train without token stderr"] = denied.stderr
    assert denied.returncode == 2, denied.stderr[-2000:]
    assert "RAY_AUTH_TOKEN" in denied.stderr and "Traceback" not in denied.stderr


def _train_on_pool(
    out: Outputs, env: Mapping[str, str], tracking: str, cluster: str, runs: Path
) -> dict[str, Any]:
    """``pretrain/vit-b32-cluster`` through a worker of the ``clipops-ray`` pool, as deployed.

    The pool comes from ``infra/prefect/ray-work-pool.json`` and the deployment from
    ``infra/prefect/deployments.yaml``, unchanged; the flow run gets the tiny recipe on CPUs
    as parameters and the cluster and tracking server as the pool's job variables. The Ray
    token and the S3 credentials are the worker's own environment (``env``). Returns the
    finished flow run (Prefect's REST answer) and the worker's output.
    """
    prefect = str(BIN / "prefect")
    template = str(ROOT / "infra" / "prefect" / "ray-work-pool.json")
    pool = [prefect, "--no-prompt", "work-pool", "create", "clipops-ray", "--type", "process"]
    out.run("work-pool create", [*pool, "--base-job-template", template], env, cwd=ROOT)
    deploy = [prefect, "--no-prompt", "deploy", "--name", "vit-b32-cluster"]
    deploy += ["--prefect-file", str(ROOT / "infra" / "prefect" / "deployments.yaml")]
    out.run("prefect deploy", deploy, env, cwd=ROOT)
    params = {
        "recipe": "tiny",
        "num_workers": 2,
        "use_gpu": False,
        "shards": f"s3://{BUCKET}/shards",
        "storage_path": f"s3://{BUCKET}/runs",
        "run_name": "prod",
        "out_dir": str(runs),
        "suite": "configs/test-suite.yaml",
        "overlap": False,
        "registry": False,  # registered below by a client without S3 credentials
        "overrides": [
            "data.global_batch_size=64",
            "optim.max_steps=4",
            "checkpoint.every_steps=2",
            "tracking.system_metrics=false",
            "tracking.log_every=1",
        ],
    }
    run = [prefect, "deployment", "run", "pretrain/vit-b32-cluster", "--params", json.dumps(params)]
    for key, value in (("ray_address", cluster), ("mlflow_tracking_uri", tracking)):
        run += ["--job-variable", f"{key}={value}"]
    run += ["--job-variable", f"clipops_home={ROOT}"]
    started = out.run("deployment run", run, env, cwd=ROOT)
    run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    worker = [prefect, "worker", "start", "--pool", "clipops-ray", "--run-once"]
    done = out.run("prefect worker", worker, env, cwd=ROOT)
    api = env["PREFECT_API_URL"]
    flow_run: dict[str, Any] = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()
    assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], done.stdout[-3000:])
    assert flow_run["job_variables"]["ray_address"] == cluster
    # the flow's ray_address=auto resolved to the pool's job variable: the head's 4 CPUs
    assert "connected to Ray cluster at auto (4 CPUs)" in done.stdout + done.stderr
    return flow_run


def _finished_run(tracking: str, run_name: str) -> str:
    """The MLflow run of training ``run_name`` on the server: finished, 4 steps, evaluated."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("clip-tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], f"tags.`clipops.run_name` = '{run_name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    run_id = str(runs[0].info.run_id)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert 0.0 <= runs[0].data.metrics["transfer/synthetic-test/zero_shot/top1"] <= 1.0
    return run_id


def _embed_from_registry(tracking: str, name: str, text: str) -> list[float]:
    """Load ``models:/NAME@candidate`` through the tracking server; embed ``text``."""
    import mlflow
    import pandas as pd  # type: ignore[import-untyped]

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    finally:
        mlflow.set_tracking_uri(previous)
    frame = model.predict(pd.DataFrame({"text": [text]}), params={"task": "embed"})
    return [float(x) for x in frame["text_embedding"][0]]


def _embed_checkpoint(client: Any, prefix: str, local: Path, text: str) -> list[float]:
    """Embed ``text`` with the checkpoint under ``s3://BUCKET/PREFIX``, by clip_core alone."""
    import torch

    from clip_core.checkpoint import load_checkpoint

    for key in _bucket_keys(client, prefix):
        target = local / key[len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target))
    loaded = load_checkpoint(local)
    assert loaded.tokenizer is not None
    with torch.no_grad():
        features = loaded.model.eval().encode_text(loaded.tokenizer([text]))  # [1, D]
        features = torch.nn.functional.normalize(features, dim=-1)  # [1, D]
    return [float(x) for x in features[0]]


def _mlflow_records(tracking: str, name: str) -> dict[str, str]:
    """Params, tags and descriptions of every run and model version on the server."""
    import mlflow

    client = mlflow.MlflowClient(tracking)
    texts: dict[str, str] = {}
    experiments = client.search_experiments()
    assert experiments
    for exp in experiments:
        for run in client.search_runs([exp.experiment_id]):
            texts[f"run {run.info.run_id} params"] = json.dumps(run.data.params)
            texts[f"run {run.info.run_id} tags"] = json.dumps(run.data.tags)
    for version in client.search_model_versions(f"name='{name}'"):
        texts[f"{name} v{version.version}"] = json.dumps(version.tags) + (version.description or "")
    return texts


@pytest.fixture()
def scratch() -> Iterator[Path]:
    """A short private directory under /tmp (Ray's socket paths have a length limit)."""
    path = Path(tempfile.mkdtemp(prefix="/tmp/ps-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_prod_stack_end_to_end(
    moto_s3: tuple[str, Any], tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, s3 = moto_s3
    for key, value in CLIENT_ENV.items():
        monkeypatch.setenv(key, value)  # this process loads the model from the registry
    s3.create_bucket(Bucket=BUCKET)
    out = Outputs(tmp_path / "logs")
    base = {**_base_env(tmp_path), **CLIENT_ENV}
    s3_env = _s3_env(base, endpoint)
    ray_tmp = scratch / "ray"
    ray_tmp.mkdir()
    pg_dirs: list[Path] = []
    tracking = api = ""
    try:
        with ExitStack() as stack:
            pg = stack.enter_context(postgres(PG_PASSWORD))
            pg_dirs.append(pg.base)
            pg.create_database("mlflow")
            tracking = stack.enter_context(
                mlflow_server(
                    pg.url("mlflow", "postgresql+psycopg2"),
                    f"s3://{BUCKET}/mlflow",
                    s3_env,
                    tmp_path / "mlflow-server.log",
                )
            )
            cluster = stack.enter_context(ray_head({**s3_env, **RAY_AUTH}, ray_tmp))
            pg.create_database("prefect")
            api = stack.enter_context(
                prefect_server(
                    pg.url("prefect", "postgresql+asyncpg"),
                    base,
                    tmp_path / "prefect-server",
                    tmp_path / "prefect-server.log",
                )
            )
            raw = _dataset_via_dvc(out, s3_env, endpoint, tmp_path / "dvc")
            shards = f"s3://{BUCKET}/shards"
            ingest = [str(BIN / "clipops"), "ingest", str(raw / "captions.csv"), shards]
            out.run("clipops ingest", ingest, s3_env)
            assert "shards/manifest.json" in _bucket_keys(s3, "shards/")

            _train_without_token(out, s3_env, cluster)
            worker_env = {**s3_env, **RAY_AUTH, "PREFECT_API_URL": api, "PATH": PATH}
            worker_env.update(PREFECT_HOME=str(tmp_path / "prefect-client"))
            _train_on_pool(out, worker_env, tracking, cluster, tmp_path / "flow-runs")
            run_id = _finished_run(tracking, "prod")
            stored = _bucket_keys(s3, "runs/prod/")
            assert "runs/prod/final/model.safetensors" in stored, sorted(stored)
            assert "runs/prod/tokenizer-merges.txt.gz" in stored
            assert any(k.endswith("/train_state.json") for k in stored)  # Ray's checkpoints
            # the run's checkpoint/ artifact went through the server into the bucket
            logged = _bucket_keys(s3, "mlflow/")
            assert any(
                k.endswith(f"{run_id}/artifacts/checkpoint/model.safetensors") for k in logged
            )

            # registration and loading: tracking clients hold no S3 credentials
            register = [str(BIN / "clipops"), "register", "--run", run_id]
            done = out.run("clipops register", [*register, "--tracking-uri", tracking], base)
            registration = json.loads(done.stdout[done.stdout.index("{") :])
            name = str(registration["name"])
            assert "candidate" in registration["aliases"]
            text = "a photo of a red circle"
            from_registry = _embed_from_registry(tracking, name, text)
            direct = _embed_checkpoint(s3, "runs/prod/final", tmp_path / "final", text)
            assert from_registry == pytest.approx(direct, abs=1e-5)
            assert sum(x * x for x in from_registry) == pytest.approx(1.0, abs=1e-4)
            assert len(_bucket_keys(s3, "mlflow/")) > len(logged)  # the pyfunc model too

            out.texts.update(_mlflow_records(tracking, name))
        _assert_nothing_running(scratch, pg_dirs, (tracking, api))
        _assert_secret_absent(out, s3, [tmp_path, scratch, *pg_dirs])
    finally:
        for path in pg_dirs:
            shutil.rmtree(path, ignore_errors=True)


def _assert_nothing_running(scratch: Path, pg_dirs: list[Path], urls: tuple[str, ...]) -> None:
    ports = [url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[-1] for url in urls]
    needles = (str(scratch), *[str(p) for p in pg_dirs], *[f"--port {port}" for port in ports])
    deadline = time.monotonic() + 60  # Ray's daemons exit shortly after their driver
    while (left := processes_mentioning(needles)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left


def _assert_secret_absent(out: Outputs, s3: Any, roots: list[Path]) -> None:
    secrets_ = (S3_SECRET, PG_PASSWORD, RAY_TOKEN)
    for label, text in out.texts.items():
        for secret in secrets_:
            assert secret not in text, f"{secret} in {label}"
    objects = 0
    for key in _bucket_keys(s3, ""):
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        objects += 1
        for secret in secrets_:
            assert secret.encode() not in body, f"{secret} in s3://{BUCKET}/{key}"
    assert objects > 10
    for root in roots:
        for secret in secrets_:
            hits = files_containing(root, secret.encode())
            assert not hits, f"{secret} in {hits}"
