"""`clipops validate s3://...`: the same validation as for a local directory, on object storage.

S3 is the session's moto server (real HTTP on loopback), reached through the ``AWS_*``
environment variables as a deployment would; the ingest output is written there by
``clipops ingest``. The failure modes (no manifest, unreachable endpoint, no credentials)
fail before Great Expectations is imported.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from prod_stack import free_port
from s3fs import S3FileSystem

from clip_cli.main import main
from clip_data.shards import MANIFEST_NAME
from clip_data.validate import REPORT_NAME, DatasetError, validate_dataset

BUCKET = "clipops-validate"
SOURCE = "synthetic:train=10,test=4,seed=5,image_size=24"


def _use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """S3 settings from the environment only (no config files, no instance metadata)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    # fsspec reuses a filesystem made with the same options: the environment is read anew
    # by a fresh one only (as in a new `clipops` process)
    S3FileSystem.clear_instance_cache()


def _get(client: Any, key: str) -> bytes:
    return bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def _one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("clipops validate: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def bucket(moto_s3: tuple[str, Any]) -> str:
    moto_s3[1].create_bucket(Bucket=BUCKET)
    return BUCKET


def test_validate_s3_passes_like_local_and_catches_a_tampered_shard(
    moto_s3: tuple[str, Any],
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint, client = moto_s3
    _use_endpoint(monkeypatch, endpoint)
    uri = f"s3://{bucket}/ds"
    assert main(["ingest", SOURCE, uri, "--workers", "1"]) == 0
    capsys.readouterr()
    manifest = json.loads(_get(client, f"ds/{MANIFEST_NAME}"))

    assert main(["validate", uri + "/"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"validation passed: {uri} ({manifest['counts']['accepted']} rows")
    assert err == ""
    remote = json.loads(_get(client, f"ds/{REPORT_NAME}"))
    assert remote["success"] is True and remote["dataset"] == uri
    assert remote["rows"] == manifest["counts"]["accepted"] == 14

    # The very same objects, downloaded, validate to the very same results locally.
    local = tmp_path / "ds"
    local.mkdir()
    listed = client.list_objects_v2(Bucket=bucket, Prefix="ds/")["Contents"]
    for obj in listed:
        if not obj["Key"].endswith(REPORT_NAME):
            (local / obj["Key"][3:]).write_bytes(_get(client, obj["Key"]))
    local_report = validate_dataset(local)
    assert local_report.results == remote["results"]

    # Same rows, different bytes (another codec): only the manifest's SHA-256 can tell.
    shard = manifest["shards"][0]["file"]
    table = pq.read_table(io.BytesIO(_get(client, f"ds/{shard}")))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    client.put_object(Bucket=bucket, Key=f"ds/{shard}", Body=buf.getvalue())
    assert main(["validate", uri]) == 1
    out, err = capsys.readouterr()
    assert "FAIL shard_sha256_matches_manifest" in err and shard in err
    tampered = json.loads(_get(client, f"ds/{REPORT_NAME}"))
    assert tampered["success"] is False
    failed = [r["name"] for r in tampered["results"] if not r["success"]]
    assert failed == ["shard_sha256_matches_manifest"]

    client.delete_object(Bucket=bucket, Key=f"ds/{shard}")
    with pytest.raises(DatasetError, match=f"cannot read shard {uri}/{shard}"):
        validate_dataset(uri)


def test_validate_s3_without_an_ingest_output_is_exit_2(
    moto_s3: tuple[str, Any],
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use_endpoint(monkeypatch, moto_s3[0])
    assert main(["validate", f"s3://{bucket}/nothing-here"]) == 2
    _one_error_line(capsys.readouterr().err, f"s3://{bucket}/nothing-here has no {MANIFEST_NAME}")
    moto_s3[1].put_object(Bucket=bucket, Key=f"junk/{MANIFEST_NAME}", Body=b"{not json")
    assert main(["validate", f"s3://{bucket}/junk"]) == 2
    _one_error_line(capsys.readouterr().err, "invalid manifest")


def test_validate_s3_unreachable_endpoint_fails_fast(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert main(["validate", "s3://bucket/ds"]) == 2
    assert time.monotonic() - started < 15
    _one_error_line(capsys.readouterr().err, "s3://bucket/ds", "Could not connect")


def test_validate_s3_without_credentials(
    moto_s3: tuple[str, Any],
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _use_endpoint(monkeypatch, moto_s3[0])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["validate", f"s3://{bucket}/ds"]) == 2
    _one_error_line(capsys.readouterr().err, f"s3://{bucket}/ds", "credentials")
