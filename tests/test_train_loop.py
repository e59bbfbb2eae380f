"""clip_train.loop: what one epoch of the per-worker loop does with the device, without Ray:
values read back only on logged steps, page-locked batches for a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch

from clip_train.config import load_run_config
from clip_train.loop import JobSpec, _epoch_batches, _train_epoch
from clip_train.state import Progress
from clip_train.step import StepResult
from clip_train.tracking import StepLogger


class _Readback:
    """A 0-d "device" value that counts how often it is copied to the host."""

    reads = 0

    def __float__(self) -> float:
        _Readback.reads += 1
        return 1.0


class _Shard:
    """Stands in for Ray's dataset shard: records the iteration options, yields batches."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.kwargs: dict[str, Any] = {}

    def iter_torch_batches(self, **kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        self.kwargs = kwargs
        for _ in range(self.batches):
            yield {"image": torch.zeros(1), "tokens": torch.zeros(1)}


class _Stepper:
    device = torch.device("cpu")
    raw = None

    def step(self, images: torch.Tensor, tokens: torch.Tensor, lr: float) -> StepResult:
        value = cast(torch.Tensor, _Readback())
        return StepResult(value, value, None)


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))


def _job(steps: int) -> JobSpec:
    return JobSpec(
        model_config={},
        merges=[],
        context_length=8,
        steps_per_epoch=steps,
        total_steps=steps,
        tracking=None,
    )


def test_values_are_read_back_from_the_device_only_on_logged_steps() -> None:
    """12 steps, log_every 5: steps 1, 5, 10 and 12 are logged; loss and logit scale are
    copied to the host on those 4 steps only (8 reads), not on every step (24)."""
    cfg = load_run_config("tiny", ["tracking.log_every=5", "checkpoint.every_steps=1000"])
    logger = _Logger()
    _Readback.reads = 0
    progress = _train_epoch(
        cfg,
        job=_job(12),
        shard=_Shard(12),
        stepper=cast(Any, _Stepper()),
        progress=Progress(),
        rank=0,
        world=1,
        local_batch=cfg.per_worker_batch,
        logger=cast(StepLogger, logger),
        tokenizer=cast(Any, None),
        run_info={},
    )
    assert progress.step == 12 and progress.batch_in_epoch == 12
    assert [step for step, _ in logger.logged] == [1, 5, 10, 12]
    assert _Readback.reads == 8
    for _, metrics in logger.logged:  # rates over the interval since the last logged step
        assert metrics["train/pairs_per_s"] > 0 and 0 <= metrics["train/data_wait_fraction"] <= 1


def test_batches_for_a_gpu_are_pinned_and_a_cpu_run_is_not() -> None:
    cfg = load_run_config("tiny")
    for device, pinned in ((torch.device("cuda", 0), True), (torch.device("cpu"), False)):
        shard = _Shard(1)
        batches, first, skip = _epoch_batches(
            cfg,
            job=_job(4),
            shard=shard,
            device=device,
            progress=Progress(),
            rank=0,
            world=1,
            local_batch=8,
        )
        list(batches)
        assert (first, skip) == (0, 0)
        assert shard.kwargs["pin_memory"] is pinned and shard.kwargs["device"] == device
