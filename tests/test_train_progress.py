"""clip_train.progress: the driver's progress lines, read from a real (SQLite) MLflow run
while another thread logs steps the way rank 0 does."""

from __future__ import annotations

import itertools
import re
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from clip_train.progress import ProgressReporter, Snapshot, format_duration, progress_line
from clip_train.tracking import StepLogger, TrackingTarget, open_run

LINE = re.compile(
    r"^train step (\d+)/(\d+) \((\d+)%\) epoch (\d+)/(\d+) loss (\d+\.\d{4}) "
    r"pairs/s (\d+|-) ETA (\S+)$"
)


def test_formats() -> None:
    assert [format_duration(s) for s in (0, 9.4, 60, 125, 3725)] == [
        "0s",
        "9s",
        "1m00s",
        "2m05s",
        "1h02m",
    ]
    line = progress_line(Snapshot(40, 0, 3.81234), total_steps=160, epochs=2, pairs_per_s=161.6)
    assert line == "train step 40/160 (25%) epoch 1/2 loss 3.8123 pairs/s 162"


def _target(tmp_path: Path) -> TrackingTarget:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return open_run(uri, "progress-test", "run", {}, {})


def _log_steps(target: TrackingTarget, steps: int, *, delay: float, pause: float) -> None:
    """Log ``steps`` steps the way rank 0 does, after ``pause`` s ("Ray workers starting")."""
    logger = StepLogger(target, system_metrics=False)
    time.sleep(pause)
    for step in range(1, steps + 1):
        metrics = {"train/loss": 5.0 - step / 10, "train/epoch": float((step - 1) // 10)}
        logger.log({**metrics, "train/samples_seen": float(8 * step)}, step)
        time.sleep(delay)
    logger.close()


def _report(
    target: TrackingTarget, *, every_steps: int, every_seconds: float, delay: float, pause: float
) -> list[str]:
    lines: list[str] = []
    reporter = ProgressReporter(
        target,
        total_steps=30,
        steps_per_epoch=10,
        global_batch=8,
        every_steps=every_steps,
        every_seconds=every_seconds,
        log=lines.append,
        poll_seconds=0.1,
    )
    worker = threading.Thread(
        target=_log_steps, args=(target, 30), kwargs={"delay": delay, "pause": pause}
    )
    with reporter:
        worker.start()
        worker.join()
        time.sleep(0.3)
    return lines


def test_a_line_every_n_steps(tmp_path: Path) -> None:
    """With the time floor out of reach, lines come every ``every_steps`` steps and at the end."""
    lines = _report(_target(tmp_path), every_steps=10, every_seconds=600, delay=0.05, pause=0.0)
    parsed = [m.groups() for m in map(LINE.match, lines) if m]
    assert len(parsed) == len(lines), lines
    steps = [int(g[0]) for g in parsed]
    assert steps == sorted(set(steps)) and steps[-1] == 30, lines
    assert all(b - a >= 10 or b == 30 for a, b in itertools.pairwise(steps)), steps
    assert {g[1] for g in parsed} == {"30"} and {g[4] for g in parsed} == {"3"}
    last = parsed[-1]
    assert last[3] == "3" and float(last[5]) == 2.0 and last[7] == "0s"  # epoch 3, 5 - 30/10


def test_a_heartbeat_while_waiting_and_a_line_at_least_every_interval(tmp_path: Path) -> None:
    """Before the first step and between far-apart step lines, the time floor speaks."""
    lines = _report(_target(tmp_path), every_steps=1000, every_seconds=0.4, delay=0.1, pause=1.0)
    assert lines[0].startswith("train waiting for the first step"), lines
    steps = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    # 30 steps over >= 3 s with a 0.4 s floor: several lines, though no 1000-step gap occurred
    assert len(steps) >= 3 and steps[-1] == 30, lines
    assert steps == sorted(set(steps)), lines


def test_a_resumed_run_starts_from_new_values(tmp_path: Path) -> None:
    """The previous attempt's last values (step 12) are not reported as this attempt's."""
    target = _target(tmp_path)
    client = MlflowClient(target.uri)
    for key, value in (("train/loss", 4.0), ("train/samples_seen", 96.0), ("train/epoch", 1.0)):
        client.log_metric(target.run_id, key, value, step=12)
    lines: list[str] = []
    reporter = ProgressReporter(
        target,
        total_steps=20,
        steps_per_epoch=10,
        global_batch=8,
        every_steps=1,
        every_seconds=60,
        log=lines.append,
        poll_seconds=0.05,
    )
    with reporter:
        time.sleep(0.5)
        assert lines == []
        for step in (13, 14):
            client.log_metric(target.run_id, "train/samples_seen", 8.0 * step, step=step)
            client.log_metric(target.run_id, "train/loss", 3.0, step=step)
            time.sleep(0.3)
    steps = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    assert steps == [13, 14], lines
