"""S3 failure modes (bad credentials, unreachable endpoint) and ingest output to ``s3://``.

Bad credentials need a server that checks them: moto's server only does when started with
``INITIAL_NO_AUTH_ACTION_COUNT=0`` (read when moto is imported), so that one runs in its own
process here, leaving the session's permissive ``moto_s3`` server alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prod_stack import free_port

from clip_cli.main import main
from clip_data.errors import DestinationError, SourceError
from clip_data.ingest import IngestConfig, IngestFailed, ingest
from clip_data.sources import open_source


def _options(endpoint: str, key: str = "testing") -> dict[str, Any]:
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": key, "secret": key}


@pytest.fixture(scope="module")
def auth_endpoint() -> Iterator[str]:
    """A moto S3 server (own process) that rejects unknown access keys."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _assert_short(error: BaseException, *needles: str) -> None:
    message = str(error)
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, message
    assert error.__cause__ is None and error.__suppress_context__


@pytest.mark.parametrize("uri", ["s3://locked/caps.csv", "s3://locked/folder", "s3://locked/wds/"])
def test_bad_credentials_are_a_short_source_error(auth_endpoint: str, uri: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        list(open_source(uri, storage_options=_options(auth_endpoint, key="AKIABOGUS")))
    _assert_short(caught.value, uri, "access denied", "credentials")
    assert time.monotonic() - started < 30


def test_bad_credentials_cli_exit_2_without_traceback(
    auth_endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = json.dumps(_options(auth_endpoint, key="AKIABOGUS"))
    argv = ["ingest", "s3://locked/caps.csv", str(tmp_path / "out"), "--workers", "1"]
    assert main([*argv, "--option", f"storage_options={options}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipops ingest: error: cannot read source 's3://locked/caps.csv'")
    assert "access denied" in err and err.count("\n") == 1 and "Traceback" not in err
    assert "AKIABOGUS" not in err
    assert not (tmp_path / "out").exists()


def test_unreachable_endpoint_fails_fast_by_default() -> None:
    """No retry settings given: the S3 client defaults keep this to seconds, not a minute."""
    options = _options(f"http://127.0.0.1:{free_port()}")
    for uri in ("s3://bucket/caps.csv", "s3://bucket/folder"):
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            list(open_source(uri, storage_options=options))
        elapsed = time.monotonic() - started
        _assert_short(caught.value, uri, "Could not connect")
        assert elapsed < 12, f"{uri}: {elapsed:.1f} s"


# --------------------------------------------------------------------------- output to S3


def _objects(client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
    }


def test_ingest_to_s3_uploads_manifest_last_and_replaces(moto_s3: tuple[str, Any]) -> None:
    endpoint, client = moto_s3
    client.create_bucket(Bucket="clipops-out")
    opts = _options(endpoint)
    uri = "s3://clipops-out/datasets/syn"

    def run(train: int, workers: int = 1) -> dict[str, Any]:
        config = IngestConfig(workers=workers, max_bad_fraction=1.0)
        options = {"train": train, "test": 2, "image_size": 16}
        return dict(
            ingest(
                "synthetic",
                uri,
                config,
                "synthetic",
                progress=False,
                dest_storage_options=opts,
                **options,
            )
        )

    manifest = run(40)
    objects = _objects(client, "clipops-out", "datasets/syn/")
    assert set(objects) == {"manifest.json", "quarantine.parquet", "part-00000.parquet"}
    assert json.loads(objects["manifest.json"]) == manifest
    assert manifest["counts"]["accepted"] == 42
    assert "dvc_md5" in manifest["dataset_version"]
    for shard in manifest["shards"]:
        assert hashlib.sha256(objects[shard["file"]]).hexdigest() == shard["sha256"]
    # an idempotent re-run (with two workers) gives identical objects
    run(40, workers=2)
    assert _objects(client, "clipops-out", "datasets/syn/") == objects
    # a replacement drops files the new output does not have
    client.put_object(Bucket="clipops-out", Key="datasets/syn/validation.json", Body=b"{}")
    smaller = run(5)
    assert set(_objects(client, "clipops-out", "datasets/syn/")) == set(objects)
    assert smaller["counts"]["accepted"] == 7
    # a prefix holding something else is refused, and left alone
    client.put_object(Bucket="clipops-out", Key="foreign/notes.txt", Body=b"keep")
    with pytest.raises(FileExistsError, match="not an ingest output"):
        ingest(
            "synthetic:train=2",
            "s3://clipops-out/foreign",
            IngestConfig(workers=1),
            progress=False,
            dest_storage_options=opts,
        )
    assert _objects(client, "clipops-out", "foreign/") == {"notes.txt": b"keep"}


def test_ingest_from_s3_reads_images_in_workers_and_fails_like_local(
    moto_s3: tuple[str, Any], tmp_path: Path
) -> None:
    """Lazy loaders carry the S3 filesystem to the workers; IngestFailed names the URL."""
    endpoint, client = moto_s3
    client.create_bucket(Bucket="clipops-lazy")
    from PIL import Image

    lines = ["filepath,caption"]
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (12, 12 + i), (i * 40, 0, 0)).save(path)
        client.put_object(Bucket="clipops-lazy", Key=f"src/{i}.png", Body=path.read_bytes())
        lines.append(f"{i}.png,picture {i}")
    lines += ["gone.png,missing", "gone2.png,missing too"]
    client.put_object(Bucket="clipops-lazy", Key="src/caps.csv", Body="\n".join(lines).encode())
    opts = _options(endpoint)
    config = IngestConfig(workers=2, chunk_size=2, max_bad_fraction=0.1)
    with pytest.raises(IngestFailed) as caught:
        ingest(
            "s3://clipops-lazy/src/caps.csv",
            "s3://clipops-lazy/out",
            config,
            progress=False,
            storage_options=opts,
            dest_storage_options=opts,
        )
    assert caught.value.manifest["counts"]["accepted"] == 6
    assert "see s3://clipops-lazy/out/quarantine.parquet" in caught.value.summary
    assert "manifest.json" in _objects(client, "clipops-lazy", "out/")  # written all the same


def test_bad_credentials_for_the_destination(auth_endpoint: str) -> None:
    with pytest.raises(DestinationError) as caught:
        ingest(
            "synthetic:train=2",
            "s3://locked/out",
            IngestConfig(workers=1),
            progress=False,
            dest_storage_options=_options(auth_endpoint, key="AKIABOGUS"),
        )
    _assert_short(caught.value, "s3://locked/out", "access denied")
