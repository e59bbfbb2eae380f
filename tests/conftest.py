"""Shared test fixtures.

``open_clip_wheel``: the ``open_clip_torch`` wheel (an independent reference implementation of
CLIP, also the carrier of OpenAI's BPE merges file), downloaded once with ``pip download`` into
a per-user cache and reused by every test run afterwards. Tests that use it are marked
``network``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

OPEN_CLIP_VERSION = "3.3.0"  # `pip index versions open_clip_torch` listed 3.3.0 as the latest
WHEEL_CACHE = Path.home() / ".cache" / "clipops-test" / "open_clip_wheel"


def download_open_clip_wheel() -> Path:
    """The open_clip_torch wheel, downloaded once into the cache directory.

    Same cache directory, version and ``pip download --no-deps`` call as the tokenizer tests,
    so whichever runs first fills the cache for the other.
    """
    pattern = f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"
    found = sorted(WHEEL_CACHE.glob(pattern))
    if found:
        return found[0]
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += [f"open_clip_torch=={OPEN_CLIP_VERSION}", "-d", str(WHEEL_CACHE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    found = sorted(WHEEL_CACHE.glob(pattern))
    if proc.returncode != 0 or not found:
        pytest.fail(f"pip download failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return found[0]


@pytest.fixture(scope="session")
def open_clip_wheel() -> Path:
    """Path of the cached ``open_clip_torch`` wheel (downloaded on first use)."""
    return download_open_clip_wheel()


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """Run a module's tests with one intra-op thread, restoring the setting afterwards.

    Tiny models gain nothing from intra-op parallelism, and on a busy shared machine the
    thread hand-offs made such tests 10-30x slower (seconds per test instead of tenths).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[tuple[str, Any]]:
    """An S3-compatible HTTP endpoint on loopback (moto's threaded server) and a boto3 client.

    Real HTTP, so subprocesses (the DVC CLI, servers) reach it too. Credentials "testing".
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        yield endpoint, client
    finally:
        server.stop()
