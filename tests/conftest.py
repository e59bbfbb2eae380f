"""Shared test fixtures, and the scheduling of the suite on three lanes.

``./dev test`` runs pytest with ``-n 3`` (pytest-xdist): most of the suite's time goes to a few
end-to-end tests that start servers, Ray clusters and many Python processes one after another,
waiting on each other much of the time, so three lanes keep the two cores busy (BENCHMARKS.md,
"Test suite"). :func:`pytest_xdist_make_scheduler` keeps each test file on one worker (module
fixtures run once), deals the long files out first, longest first, each to the lane with the
least of them (LPT), then hands the other files to whichever lane drains first.

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

# Seconds each long test file took on a quiet 2-core machine (pytest --durations): only their
# order and relative size matter. Files not listed are short and scheduled afterwards.
LONG_FILES = {
    "tests/test_train_ray.py": 480,
    "tests/test_dvc_pipeline.py": 340,
    "tests/test_flows_e2e.py": 315,
    "tests/test_prod_stack.py": 360,
}

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


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Longest-first file scheduling for ``pytest -n N`` (see the module docstring)."""
    from xdist.scheduler import LoadScopeScheduling

    class LongFilesFirst(LoadScopeScheduling):
        collection: list[str] | None  # set by schedule() (xdist is untyped)

        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("::", 1)[0]  # one unit per file

        def schedule(self) -> None:
            if self.collection is not None or not self._check_nodes_have_same_collection():
                super().schedule()
                return
            collection = list(next(iter(self.registered_collections.values())))
            units: dict[str, dict[str, bool]] = {}
            for nodeid in collection:
                units.setdefault(self._split_scope(nodeid), {})[nodeid] = False
            long = sorted((f for f in units if f in LONG_FILES), key=lambda f: -LONG_FILES[f])
            if not long or len(units) < len(self.nodes):
                super().schedule()
                return
            self.collection = collection
            for scope in long + [f for f in units if f not in LONG_FILES]:
                self.workqueue[scope] = units[scope]
            lanes = {node: 0 for node in self.nodes}
            for scope in long:  # each long file to the lane with the least work so far
                node = min(lanes, key=lambda n: lanes[n])
                lanes[node] += LONG_FILES[scope]
                self._assign_work_unit(node)  # pops ``scope``, the head of the queue
            for node in self.nodes:
                self._reschedule(node)  # a short file behind, so every lane can start

    return LongFilesFirst(config, log)
