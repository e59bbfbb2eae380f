"""Pretraining on an existing Ray cluster with shards and run storage on S3.

The cluster is a real one started with ``ray start --head`` (its own temp dir and process
group, so nothing else on the machine is touched); S3 is moto's HTTP endpoint on loopback.
The cluster's processes get the S3 credentials from their own environment, as cluster nodes
do in production; the driver only gets the address.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prod_stack import ray_head

pytestmark = pytest.mark.slow


RAY_TOKEN_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture()
def ray_cluster(moto_s3: tuple[str, Any]) -> Iterator[str]:
    """``ray start --head`` with 4 logical CPUs and token auth; yields its GCS address."""
    temp = Path(tempfile.mkdtemp(prefix="/tmp/rc-"))  # Ray's socket paths must stay short
    try:
        with ray_head({**os.environ, **_s3_env(moto_s3[0]), **RAY_TOKEN_ENV}, temp) as address:
            yield address
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_train_on_existing_cluster_with_shards_and_checkpoints_on_s3(
    moto_s3: tuple[str, Any], ray_cluster: str, tmp_path: Path
) -> None:
    """infra.ray_address joins the cluster; shards, checkpoints and final model on s3://."""
    endpoint, client = moto_s3
    client.create_bucket(Bucket="clipops-train")
    clipops = str(Path(sys.executable).parent / "clipops")
    local = tmp_path / "shards"
    source = "synthetic:train=256,test=32,seed=0,image_size=64"
    subprocess.run([clipops, "ingest", source, str(local)], check=True, capture_output=True)
    for path in local.iterdir():
        client.upload_file(str(path), "clipops-train", f"shards/{path.name}")
    env = {**os.environ, **_s3_env(endpoint)}
    settings_without_token = [f"infra.ray_address={ray_cluster}", "infra.run_name=no-token"]
    denied = subprocess.run(
        [clipops, "train", "--config", "tiny", "--set=data.shards=s3://clipops-train/shards"]
        + [f"--set={s}" for s in settings_without_token],
        env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")},
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert denied.returncode == 2, denied.stderr[-2000:]
    assert "RAY_AUTH_TOKEN" in denied.stderr and "Traceback" not in denied.stderr
    env.update(RAY_TOKEN_ENV)  # the driver holds the cluster's token, from its environment
    settings = [
        "data.shards=s3://clipops-train/shards",
        "data.global_batch_size=64",
        "optim.max_steps=4",
        "checkpoint.every_steps=2",
        "infra.storage_path=s3://clipops-train/runs",
        "infra.run_name=s3-run",
        f"infra.ray_address={ray_cluster}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.system_metrics=false",
    ]
    done = subprocess.run(
        [clipops, "train", "--config", "tiny", *[f"--set={s}" for s in settings]],
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["steps"] == 4
    assert f"connected to Ray cluster at {ray_cluster}" in done.stdout, done.stdout[-2000:]
    assert result["final_model"] == "s3://clipops-train/runs/s3-run/final"
    keys = {
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket="clipops-train", Prefix="runs/s3-run/"
        )
        for o in page.get("Contents", [])
    }
    states = [k for k in keys if k.endswith("/train_state.json")]
    assert states, sorted(keys)
    assert "runs/s3-run/final/model.safetensors" in keys, sorted(keys)
    assert "runs/s3-run/tokenizer-merges.txt.gz" in keys
