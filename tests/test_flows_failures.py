"""What the flows retry, and the one-line reason of a failed run (flows.failures)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from clip_train.config import RunConfigError
from clip_train.tracking import TrackingUnreachableError
from flows.failures import FlowFailureError, is_transient, one_line, one_line_failures


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        if cause is None:
            raise exc
        raise exc from cause
    except BaseException as caught:
        return caught


def test_only_transient_errors_are_retried() -> None:
    import ray.exceptions as rex

    assert is_transient(ConnectionError("reset by peer"))
    assert is_transient(TimeoutError("read timed out"))
    assert is_transient(rex.NodeDiedError("node 1 died"))
    assert is_transient(_raised(RuntimeError("training failed"), rex.WorkerCrashedError()))
    assert not is_transient(RunConfigError("optim: unknown key(s) ['nope']"))
    assert not is_transient(FileNotFoundError("shards/part-0.parquet"))
    assert not is_transient(PermissionError("/data"))
    assert not is_transient(TrackingUnreachableError("MLflow tracking server http://x is down"))
    assert not is_transient(RuntimeError("a bug"))
    # an OSError raised while handling a config error is still the config error's failure
    assert not is_transient(_raised(OSError("cleanup"), ValueError("bad value")))


def test_failures_leave_the_flow_as_one_line() -> None:
    with pytest.raises(RunConfigError, match="unknown key"), one_line_failures():
        raise RunConfigError("optim: unknown key(s) ['nope']")  # one line: kept as it is
    with pytest.raises(FlowFailureError) as info, one_line_failures():
        raise RuntimeError("Training failed.\nTraceback (most recent call last):\n  ...")
    assert str(info.value) == "RuntimeError: Training failed."
    assert isinstance(info.value.__cause__, RuntimeError)
    assert one_line(ValueError("")) == "ValueError: (no message)"
    assert len(one_line(ValueError("x" * 1000))) == 400


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_a_real_task_retries_a_network_error_but_not_a_config_error(
    prefect_server: None,
) -> None:
    from prefect import flow, task

    from flows.failures import transient

    attempts: dict[str, int] = {}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient)
    def flaky(kind: str) -> str:
        attempts[kind] = attempts.get(kind, 0) + 1
        if kind == "network" and attempts[kind] < 3:
            raise ConnectionError("connection reset")
        if kind == "config":
            raise RunConfigError("optim: unknown key(s) ['nope']")
        return kind

    @flow
    def run(kind: str) -> Any:
        return flaky(kind)

    assert run("network") == "network" and attempts["network"] == 3
    with pytest.raises(RunConfigError, match="unknown key"):
        run("config")
    assert attempts["config"] == 1
