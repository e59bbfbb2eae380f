"""Dataset versioning: demo dataset determinism, DVC md5 parity, manifest stamps, remotes.

The remote tests drive the real DVC command line (``python -m dvc``) in temporary git+DVC
repositories: a local-directory remote and an S3 remote served by moto's
``ThreadedMotoServer`` on loopback, with credentials kept in ``.dvc/config.local``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from clip_data.checks import CheckedRecord
from clip_data.shards import MANIFEST_NAME, ShardConfig, ShardWriter, read_manifest
from clip_data.versioning import (
    DATA_DVC,
    DvcError,
    dvc,
    dvc_md5,
    main,
    recorded_md5,
    restore,
    stamp_manifest,
    write_demo_raw,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKET = "clipops-dvc-test"


@pytest.fixture(scope="module", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep DVC's site cache and the AWS SDKs away from the developer's own setup."""
    base = tmp_path_factory.mktemp("env")
    empty = base / "aws-empty"
    empty.write_text("", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
        ):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.fspath(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.fspath(empty))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("DVC_SITE_CACHE_DIR", os.fspath(base / "dvc-site-cache"))
        yield


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _git_dvc_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True, capture_output=True)
    dvc("init", "-q", cwd=path)
    return path


@pytest.fixture(scope="module")
def repo(_isolated_env: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git+DVC repository with ``payload/`` tracked by ``payload.dvc``."""
    root = _git_dvc_repo(tmp_path_factory.mktemp("dvcrepo") / "repo")
    payload = root / "payload"
    (payload / "sub").mkdir(parents=True)
    (payload / "a.txt").write_text("alpha\r\nwindows line ending kept\n", encoding="utf-8")
    (payload / "sub" / "b.bin").write_bytes(random.Random(1).randbytes(50_000))
    (payload / "empty.dat").write_bytes(b"")
    dvc("add", "payload", cwd=root)
    return root


@pytest.fixture(scope="module")
def s3_endpoint(_isolated_env: None, moto_s3: tuple[str, Any]) -> str:
    """``http://127.0.0.1:PORT`` of the moto S3 server with the bucket ``BUCKET`` created."""
    endpoint, client = moto_s3
    client.create_bucket(Bucket=BUCKET)
    return endpoint


# --------------------------------------------------------------------------- demo dataset


def test_write_demo_raw_is_deterministic(tmp_path: Path) -> None:
    a = write_demo_raw(tmp_path / "a", train=12, test=5, seed=3)
    b = write_demo_raw(tmp_path / "b", train=12, test=5, seed=3)
    other = write_demo_raw(tmp_path / "c", train=12, test=5, seed=4)
    assert _snapshot(a) == _snapshot(b)
    assert dvc_md5(a) == dvc_md5(b)
    assert dvc_md5(a).endswith(".dir")
    assert dvc_md5(other) != dvc_md5(a)

    lines = (a / "captions.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "filepath,caption,split"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 17
    assert [r[-1] for r in rows] == ["train"] * 12 + ["test"] * 5
    assert all((a / r[0]).is_file() for r in rows)
    assert len(list((a / "images").glob("*.png"))) == 17

    with pytest.raises(FileExistsError):
        write_demo_raw(a, train=1, test=1)
    write_demo_raw(a, train=12, test=5, seed=4, overwrite=True)
    assert dvc_md5(a) == dvc_md5(other)
    with pytest.raises(ValueError, match="train"):
        write_demo_raw(tmp_path / "d", train=-1)


def test_repo_data_dvc_matches_regenerated_demo(tmp_path: Path) -> None:
    dvc_file = REPO_ROOT / DATA_DVC
    spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
    assert spec["outs"][0]["path"] == "data"
    write_demo_raw(tmp_path / "data" / "raw")  # the defaults restore uses
    assert dvc_md5(tmp_path / "data") == recorded_md5(dvc_file)
    assert spec["outs"][0]["nfiles"] == 512 + 128 + 1


def test_repo_dvc_config_has_default_local_remote_and_no_secrets() -> None:
    config = (REPO_ROOT / ".dvc" / "config").read_text(encoding="utf-8")
    assert "remote = local" in config
    assert "url = local-remote" in config  # relative to .dvc/: exists on any clone once pushed
    assert "/local-remote" in (REPO_ROOT / ".dvc" / ".gitignore").read_text(encoding="utf-8")
    for secret in ("access_key_id", "secret_access_key", "session_token"):
        assert secret not in config


# --------------------------------------------------------------------------- md5 parity


def test_dvc_md5_matches_dvc_add(repo: Path) -> None:
    spec = yaml.safe_load((repo / "payload.dvc").read_text(encoding="utf-8"))
    assert dvc_md5(repo / "payload") == spec["outs"][0]["md5"]
    assert spec["outs"][0]["md5"].endswith(".dir")

    demo = write_demo_raw(repo / "demo", train=6, test=2)
    single = repo / "single.bin"
    single.write_bytes(b"\x00\x01dvc\r\n" * 1000)
    dvc("add", "demo", "single.bin", cwd=repo)
    assert dvc_md5(demo) == recorded_md5(repo / "demo.dvc")
    assert dvc_md5(single) == recorded_md5(repo / "single.bin.dvc")
    assert dvc_md5(single) == hashlib.md5(single.read_bytes()).hexdigest()  # DVC 3: plain md5
    with pytest.raises(FileNotFoundError):
        dvc_md5(repo / "missing")


# --------------------------------------------------------------------------- manifest stamp


def _row(i: int) -> CheckedRecord:
    image = random.Random(i).randbytes(3_000)
    return CheckedRecord(
        key=f"k{i:04d}",
        image=image,
        caption=f"caption {i}",
        width=8,
        height=8,
        sha256=hashlib.sha256(image).hexdigest(),
        source="unit",
        split="train",
        extra={},
    )


def test_stamp_manifest(tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    with ShardWriter(dest, ShardConfig(target_shard_bytes=8_000, compression="none")) as writer:
        for i in range(10):
            writer.add(_row(i))
    before = read_manifest(dest)
    assert len(before["shards"]) >= 2

    md5 = stamp_manifest(dest)
    after = read_manifest(dest)
    assert after["dataset_version"] == {"dvc_md5": md5, "scheme": "dvc-md5"}
    assert {k: v for k, v in after.items() if k != "dataset_version"} == before
    text = (dest / MANIFEST_NAME).read_text(encoding="utf-8")
    assert text == json.dumps(after, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    # The version is the DVC md5 of the directory without its manifest, and stamping is
    # idempotent.
    copy = tmp_path / "copy"
    shutil.copytree(dest, copy)
    (copy / MANIFEST_NAME).unlink()
    assert md5 == dvc_md5(copy)
    assert stamp_manifest(dest) == md5
    # The same with the md5s the writer took while writing (those files are not read again).
    assert len(writer.file_md5s) == len(before["shards"]) + 1
    assert stamp_manifest(dest, writer.file_md5s) == md5
    # A known md5 is used as given: a wrong one gives another version.
    wrong = dict.fromkeys(writer.file_md5s, "0" * 32)
    assert stamp_manifest(dest, wrong) != md5
    assert stamp_manifest(dest) == md5

    # Any change to a shard changes the version.
    shard = dest / before["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    changed = stamp_manifest(dest)
    assert changed != md5
    assert read_manifest(dest)["dataset_version"]["dvc_md5"] == changed


# --------------------------------------------------------------------------- remotes


def _wipe(repo: Path, out: str) -> None:
    shutil.rmtree(repo / out)
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)


@pytest.mark.slow
def test_push_pull_s3(repo: Path, s3_endpoint: str) -> None:
    """The S3 round trip; the local-remote one is in ``test_restore_on_fresh_clone``."""
    import boto3

    original = _snapshot(repo / "payload")
    dvc("remote", "add", "s3", f"s3://{BUCKET}/dvcstore", cwd=repo)
    dvc("remote", "modify", "s3", "endpointurl", s3_endpoint, cwd=repo)
    dvc("remote", "modify", "--local", "s3", "access_key_id", "testing", cwd=repo)
    dvc("remote", "modify", "--local", "s3", "secret_access_key", "testing", cwd=repo)
    shared = (repo / ".dvc" / "config").read_text(encoding="utf-8")
    assert "testing" not in shared and "endpointurl" in shared
    assert "secret_access_key = testing" in (repo / ".dvc" / "config.local").read_text("utf-8")

    dvc("push", "-r", "s3", "payload.dvc", cwd=repo)
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    md5 = recorded_md5(repo / "payload.dvc").removesuffix(".dir")
    assert f"dvcstore/files/md5/{md5[:2]}/{md5[2:]}.dir" in keys
    assert len(keys) == 3 + 1  # three files and the .dir listing

    _wipe(repo, "payload")
    dvc("pull", "-r", "s3", "payload.dvc", cwd=repo)
    assert _snapshot(repo / "payload") == original


def test_push_to_missing_bucket_names_the_remote(repo: Path, s3_endpoint: str) -> None:
    dvc("remote", "add", "nobucket", "s3://no-such-bucket/x", cwd=repo)
    dvc("remote", "modify", "nobucket", "endpointurl", s3_endpoint, cwd=repo)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with pytest.raises(DvcError) as info:
        dvc("push", "-r", "nobucket", "payload.dvc", cwd=repo, env=creds, timeout=120)
    assert info.value.returncode != 0
    assert "remote 'nobucket'" in str(info.value)
    assert "dvc push -r nobucket payload.dvc failed" in str(info.value)
    assert info.value.stderr.strip()


@pytest.mark.slow
def test_restore_on_fresh_clone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clone = tmp_path / "clone"
    (clone / ".dvc").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(clone)], check=True, capture_output=True)
    for rel in (".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", DATA_DVC):
        shutil.copyfile(REPO_ROOT / rel, clone / rel)

    # The clone's local remote is empty: restore regenerates and caches the dataset.
    assert restore(clone) == "regenerated"
    status = dvc("status", DATA_DVC, cwd=clone)
    assert "up to date" in status.stdout
    assert main(["push", "--repo", os.fspath(clone)]) == 0
    assert any((clone / ".dvc" / "local-remote").rglob("*"))

    # With the local remote filled, a later restore pulls from it: same bytes.
    original = _snapshot(clone / "data")
    _wipe(clone, "data")
    assert main(["restore", "--repo", os.fspath(clone)]) == 0
    assert "data.dvc: pulled" in capsys.readouterr().out
    assert _snapshot(clone / "data") == original
    assert dvc_md5(clone / "data") == recorded_md5(clone / DATA_DVC)
