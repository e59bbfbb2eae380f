"""Progress lines of a running training, printed by the driver.

Rank 0 logs its step metrics to the run's MLflow run (:class:`clip_train.tracking.StepLogger`);
the driver's :class:`ProgressReporter` reads the run's latest values in a background thread
and writes one line every ``every_steps`` steps, and at least every ``every_seconds`` seconds
(also while Ray is still starting the workers), through the caller's ``log`` function: the
terminal, a log file, or the Prefect task's logger. It works the same for a local and a
remote Ray cluster, since it needs only the tracking server, and whether or not stdout is a
terminal. A line reads::

    train step 40/243 (16%) epoch 1/3 loss 3.8121 pairs/s 162 ETA 2m05s
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from clip_train.tracking import TrackingTarget


@dataclass(frozen=True)
class Snapshot:
    """The latest logged state of a training run."""

    step: int
    epoch: int
    loss: float


def format_duration(seconds: float) -> str:
    """``125`` -> ``"2m05s"``, ``3725`` -> ``"1h02m"``, ``9`` -> ``"9s"``."""
    s = max(round(seconds), 0)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_line(
    snap: Snapshot, *, total_steps: int, epochs: int, pairs_per_s: float | None
) -> str:
    """One progress line; ``pairs_per_s`` None (no rate measured yet) prints ``-``."""
    pct = 100 * snap.step / max(total_steps, 1)
    rate = "-" if pairs_per_s is None else f"{pairs_per_s:.0f}"
    return (
        f"train step {snap.step}/{total_steps} ({pct:.0f}%) epoch {snap.epoch + 1}/{epochs} "
        f"loss {snap.loss:.4f} pairs/s {rate}"
    )


class ProgressReporter:
    """Background thread: reads the MLflow run's latest step metrics, logs progress lines."""

    def __init__(
        self,
        target: TrackingTarget,
        *,
        total_steps: int,
        steps_per_epoch: int,
        global_batch: int,
        every_steps: int,
        every_seconds: float,
        log: Callable[[str], None],
        poll_seconds: float = 1.0,
    ) -> None:
        self.target = target
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = global_batch
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.log = log
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipops-progress", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def read(self, client: object) -> Snapshot | None:
        """The run's latest step metrics, or None before rank 0 logged its first step."""
        metrics = client.get_run(self.target.run_id).data.metrics  # type: ignore[attr-defined]
        if "train/samples_seen" not in metrics or "train/loss" not in metrics:
            return None
        step = round(metrics["train/samples_seen"] / self.global_batch)
        return Snapshot(step, int(metrics.get("train/epoch", 0)), float(metrics["train/loss"]))

    def _run(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.target.uri)
        started = last_time = time.monotonic()
        # A resumed run's MLflow run already holds the previous attempt's last values: they
        # are not progress of this attempt, so lines start once the values change.
        baseline = self._try_read(client)
        first: tuple[int, float] | None = None  # (step, time) of the first new step seen
        last_step = -1
        while not self._stop.wait(self.poll_seconds):
            now = time.monotonic()
            try:
                snap = self.read(client)
            except Exception as exc:  # a busy or briefly unreachable store: say so, go on
                if now - last_time >= self.every_seconds:
                    self._emit(f"train progress unavailable ({type(exc).__name__}: {exc})"[:200])
                    last_time = now
                continue
            if snap is None or snap == baseline:
                if now - last_time >= self.every_seconds:
                    waited = format_duration(now - started)
                    self._emit(f"train waiting for the first step ({waited}: Ray workers starting)")
                    last_time = now
                continue
            baseline = None  # from here on every value is this attempt's
            if first is None:
                first = (snap.step, now)
            due = snap.step >= last_step + self.every_steps or snap.step == self.total_steps
            if snap.step > last_step and (due or now - last_time >= self.every_seconds):
                self._emit(self._line(snap, first, now))
                last_step, last_time = snap.step, now
            elif now - last_time >= self.every_seconds:
                self._emit(self._line(snap, first, now) + " (no new step)")
                last_time = now
        final = self._try_read(client)  # the training ended: its last logged step
        if final is not None and final != baseline and final.step > last_step:
            self._emit(self._line(final, first or (final.step, time.monotonic()), time.monotonic()))

    def _try_read(self, client: object) -> Snapshot | None:
        try:
            return self.read(client)
        except Exception:
            return None

    def _line(self, snap: Snapshot, first: tuple[int, float], now: float) -> str:
        epochs = -(-self.total_steps // max(self.steps_per_epoch, 1))
        done, elapsed = snap.step - first[0], now - first[1]
        rate = done / elapsed if done > 0 and elapsed > 0 else None  # steps/s
        line = progress_line(
            snap,
            total_steps=self.total_steps,
            epochs=epochs,
            pairs_per_s=None if rate is None else rate * self.global_batch,
        )
        eta = "-" if rate is None else format_duration((self.total_steps - snap.step) / rate)
        return f"{line} ETA {eta}"

    def _emit(self, line: str) -> None:
        with contextlib.suppress(Exception):  # a failing log sink must not stop the training
            self.log(line)
