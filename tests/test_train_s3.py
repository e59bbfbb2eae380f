"""Pretraining with shards and run storage on S3 (moto's HTTP endpoint on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def test_train_reads_shards_from_s3_and_checkpoints_to_s3(
    moto_s3: tuple[str, Any], tmp_path: Path
) -> None:
    """Shards on s3://, Ray checkpoints and the final model written to s3://."""
    endpoint, client = moto_s3
    client.create_bucket(Bucket="clipops-train")
    clipops = str(Path(sys.executable).parent / "clipops")
    local = tmp_path / "shards"
    source = "synthetic:train=256,test=32,seed=0,image_size=64"
    subprocess.run([clipops, "ingest", source, str(local)], check=True, capture_output=True)
    for path in local.iterdir():
        client.upload_file(str(path), "clipops-train", f"shards/{path.name}")
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    settings = [
        "data.shards=s3://clipops-train/shards",
        "data.global_batch_size=64",
        "optim.max_steps=4",
        "checkpoint.every_steps=2",
        "infra.storage_path=s3://clipops-train/runs",
        "infra.run_name=s3-run",
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
