"""The per-worker training function that Ray Train runs on every rank.

Each rank builds the model (identical init from the run seed; DDP then broadcasts rank 0's
weights), restores the latest checkpoint if Ray hands one over (after a worker failure, or
when a killed run is started again under the same name), and trains until exactly
``total_steps`` optimiser steps are done. Checkpoints are reported every
``checkpoint.every_steps`` steps and at the end; the data position (epoch, batches consumed
in the epoch) is part of the checkpoint, so a resumed epoch skips what was already trained
on instead of starting over.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from clip_core.config import ModelConfig
from clip_core.model import CLIP
from clip_core.tokenizer import ClipTokenizer
from clip_train.config import RunConfig
from clip_train.data import (
    build_dataset,
    manifest_units,
    plan_row_range,
    read_manifest_any,
    shard_urls,
    shuffle_seed,
)
from clip_train.device_check import check_device, current_device_info
from clip_train.optim import build_optimizer, cosine_lr, gather_optimizer_state
from clip_train.state import (
    LoadedTrainState,
    Progress,
    check_compatible,
    load_train_state,
    save_rng,
    save_train_state,
)
from clip_train.step import Stepper, StepResult, compile_model
from clip_train.tracking import StepLogger, TrackingTarget


@dataclass(frozen=True)
class JobSpec:
    """What the driver resolved once for every worker."""

    model_config: dict[str, Any]
    merges: list[tuple[str, str]]
    context_length: int
    steps_per_epoch: int
    total_steps: int
    tracking: TrackingTarget | None
    init_from: str | None = None  # clip_core checkpoint to initialise weights from
    resume_from: str | None = None  # training checkpoint to resume from when Ray has none
    shards: str = ""  # absolute shard directory or URI (a resumed epoch plans its rows there)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for Ray's train_loop_config."""
        out = dict(self.__dict__)
        out["tracking"] = self.tracking.__dict__ if self.tracking else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Inverse of ``to_dict``."""
        data = dict(data)
        data["merges"] = [tuple(m) for m in data["merges"]]
        data["tracking"] = TrackingTarget(**data["tracking"]) if data["tracking"] else None
        return cls(**data)


def build_model(job: JobSpec, seed: int) -> CLIP:
    """The run's model, initialised from ``seed`` (and ``init_from`` weights when given)."""
    torch.manual_seed(seed)
    model = CLIP(ModelConfig.from_dict(job.model_config))
    if job.init_from:
        from clip_core.checkpoint import load_checkpoint
        from clip_core.resize import load_resized

        load_resized(model, load_checkpoint(job.init_from).model.state_dict())
    return model


def epoch_dataset(
    cfg: RunConfig,
    job: JobSpec,
    urls: list[str],
    units: list[dict[str, Any]] | None,
    *,
    image_size: int | None = None,
    preprocess_cpus: float | None = None,
) -> Any:
    """The run's Ray Data pipeline over ``units`` of ``urls`` (all of them when ``None``);
    ``image_size`` and ``preprocess_cpus`` default to the model's and ``data``'s."""
    size = image_size or int(job.model_config["vision"]["image_size"])
    return build_dataset(
        urls,
        units=units,
        split=cfg.data.split,
        tokenizer=ClipTokenizer.from_merges(job.merges, context_length=job.context_length),
        image_size=size,
        scale=cfg.data.train_scale,
        seed=cfg.seed,
        preprocess_cpus=cfg.data.preprocess_cpus if preprocess_cpus is None else preprocess_cpus,
        preprocess_batch=cfg.data.preprocess_batch,
    )


def resumed_epoch_dataset(
    cfg: RunConfig, job: JobSpec, progress: Progress, rank: int, world: int
) -> Any | None:
    """This rank's rows of the rest of a resumed epoch, or ``None`` (start of an epoch, or a
    manifest without per-split row counts: the caller then skips decoded batches).

    The epoch's ``batch_in_epoch`` global batches are the first rows of the split in unit
    (manifest) order; the rest is cut into ``world`` equal, contiguous ranges, one per rank,
    each exactly the remaining steps' worth of local batches. The skipped rows' row groups
    are not read at all, and the rows skipped within a row group are not decoded. (Which rows
    the interrupted attempt had consumed is known only up to its in-flight window: Ray Data
    streams row groups to the workers dynamically; a few rows may be seen again or not in
    this epoch.)
    """
    done = progress.batch_in_epoch
    if done == 0 or not job.shards:
        return None
    manifest = read_manifest_any(job.shards)
    urls = shard_urls(job.shards, manifest)
    units = manifest_units(urls, manifest)
    if units is None:
        return None
    local = cfg.per_worker_batch * cfg.optim.accum_steps
    share = (job.steps_per_epoch - done) * local  # rows of this rank
    start = done * cfg.data.global_batch_size + rank * share
    planned = plan_row_range(units, cfg.data.split, start, start + share)
    return None if planned is None else epoch_dataset(cfg, job, urls, planned)


def _restore(job: JobSpec) -> LoadedTrainState | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as directory:
            state = load_train_state(directory)
    elif job.resume_from:
        state = load_train_state(job.resume_from)
    else:
        return None
    check_compatible(state, job.model_config)
    return state


def _report(
    progress: Progress,
    *,
    metrics: dict[str, float],
    rank: int,
    model: CLIP,
    tokenizer: ClipTokenizer,
    stepper: Stepper,
    run: dict[str, Any],
) -> None:
    """Every rank writes its part of the checkpoint; Ray merges and persists them."""
    import ray.train

    gather_optimizer_state(stepper.optimizer)  # every rank: ZeRO shards meet on rank 0
    with tempfile.TemporaryDirectory(prefix="clipops-ckpt-") as tmp:
        if rank == 0:
            save_train_state(
                tmp,
                model=model,
                tokenizer=tokenizer,
                optimizer=stepper.optimizer,
                progress=progress,
                scaler_state=stepper.scaler.state_dict() if stepper.scaler.is_enabled() else None,
                run=run,
            )
        save_rng(tmp, rank)
        ray.train.report(
            {**metrics, "step": progress.step, "epoch": progress.epoch},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
        )


def _setup(cfg: RunConfig, job: JobSpec) -> tuple[CLIP, torch.nn.Module, Stepper, Progress]:
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.infra.torch_threads)
    else:  # before any kernel: a build without this GPU's kernels fails with a clear message
        check_device(current_device_info(device.index or 0), cfg.precision.precision)
    model = build_model(job, cfg.seed)
    state = _restore(job)
    if state is not None:
        model.load_state_dict(state.model.state_dict())
    if cfg.precision.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.precision.channels_last:
        model.set_channels_last(True)
    wrapped: torch.nn.Module = ray.train.torch.prepare_model(model)
    if cfg.precision.compile:
        wrapped = compile_model(wrapped, cfg.precision.compile_backend)
    o = cfg.optim
    betas = (o.beta1, o.beta2)
    optimizer = build_optimizer(
        model, o.lr, o.weight_decay, betas, o.eps, implementation=o.adamw, sharding=o.sharding
    )
    stepper = Stepper(
        wrapped, raw=model, optimizer=optimizer, optim=o, precision=cfg.precision, device=device
    )
    progress = Progress()
    if state is not None:
        state.apply_optimizer(optimizer)
        if state.scaler:
            stepper.scaler.load_state_dict(state.scaler)
        state.restore_rng(rank)
        progress = state.progress
    return model, wrapped, stepper, progress


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` = {"run": RunConfig dict, "job": JobSpec dict}."""
    import ray.train

    cfg, job = RunConfig.from_dict(config["run"]), JobSpec.from_dict(config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, _, stepper, progress = _setup(cfg, job)
    tokenizer = ClipTokenizer.from_merges(job.merges, context_length=job.context_length)
    logger = StepLogger(job.tracking if rank == 0 else None, cfg.tracking.system_metrics)
    logger.log({"train/resume_step": progress.step}, progress.step)
    shard = ray.train.get_dataset_shard("train")
    local_batch = cfg.per_worker_batch * cfg.optim.accum_steps
    run_info = {"world_size": world, "global_batch_size": cfg.data.global_batch_size}
    try:
        while progress.step < job.total_steps:
            progress = _train_epoch(
                cfg,
                job=job,
                shard=shard,
                stepper=stepper,
                progress=progress,
                rank=rank,
                world=world,
                local_batch=local_batch,
                logger=logger,
                tokenizer=tokenizer,
                run_info=run_info,
            )
            if progress.step >= job.total_steps:
                break
            progress = Progress(progress.step, progress.epoch + 1, 0, progress.samples_seen)
        _report(
            progress,
            metrics={},
            rank=rank,
            model=model,
            tokenizer=tokenizer,
            stepper=stepper,
            run={**run_info, "final": True},
        )
    finally:
        logger.close()


def _epoch_batches(
    cfg: RunConfig,
    *,
    job: JobSpec,
    shard: Any,
    device: torch.device,
    progress: Progress,
    rank: int,
    world: int,
    local_batch: int,
) -> tuple[Any, int, int]:
    """(batches, index of the first, batches to pass over) for the rest of the epoch."""
    kwargs = {
        "batch_size": local_batch,
        "drop_last": True,
        "prefetch_batches": 4,  # keep decoded batches ready across row-group boundaries
        "local_shuffle_buffer_size": cfg.data.shuffle_buffer,
        "local_shuffle_seed": shuffle_seed(cfg.seed, progress.epoch, rank),
        "device": device,
        "pin_memory": device.type == "cuda",  # page-locked host batches: async H2D copies
    }
    tail = resumed_epoch_dataset(cfg, job, progress, rank, world)
    if tail is not None:
        return tail.iter_torch_batches(**kwargs), progress.batch_in_epoch, 0
    return shard.iter_torch_batches(**kwargs), 0, progress.batch_in_epoch


class _Interval:
    """Wall time and data wait since the last logged step (rates over the interval: values
    are read back from the device only on logged steps, which is when the clock is true)."""

    def __init__(self) -> None:
        self.start, self.waited, self.steps = 0.0, 0.0, 0
        self.reset()

    def reset(self) -> None:
        """Start a new interval now."""
        self.start, self.waited, self.steps = time.perf_counter(), 0.0, 0

    def rates(self, global_batch: int) -> dict[str, float]:
        """pairs/s and the data-wait fraction over the interval; starts the next one."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "train/pairs_per_s": global_batch * self.steps / elapsed,
            "train/data_wait_fraction": min(self.waited / elapsed, 1.0),
        }
        self.reset()
        return out


def step_metrics(result: StepResult, lr: float, progress: Progress) -> dict[str, float]:
    """One step's metrics (reads the step's values back to the host: a device sync)."""
    metrics = {
        "train/loss": result.loss,
        "train/lr": lr,
        "train/logit_scale": result.logit_scale,
        "train/epoch": float(progress.epoch),
        "train/samples_seen": float(progress.samples_seen),
    }
    if result.grad_norm_tensor is not None:
        metrics["train/grad_norm"] = float(result.grad_norm_tensor)
    return metrics


def _train_epoch(
    cfg: RunConfig,
    *,
    job: JobSpec,
    shard: Any,
    stepper: Stepper,
    progress: Progress,
    rank: int,
    world: int,
    local_batch: int,
    logger: StepLogger,
    tokenizer: ClipTokenizer,
    run_info: dict[str, Any],
) -> Progress:
    """Train the rest of ``progress.epoch``; returns the progress at its end."""
    batches, first, skip = _epoch_batches(
        cfg,
        job=job,
        shard=shard,
        device=stepper.device,
        progress=progress,
        rank=rank,
        world=world,
        local_batch=local_batch,
    )
    if first:  # a resumed epoch: its first rows were passed over without being read
        logger.log(
            {"train/resume_rows_not_decoded": float(first * cfg.data.global_batch_size)},
            progress.step,
        )
    o, interval = cfg.optim, _Interval()
    t0 = time.perf_counter()
    for index, batch in enumerate(batches, start=first):
        if index < skip:  # an older manifest: the rows are decoded, then passed over
            t0 = interval.start = time.perf_counter()
            continue
        if index >= job.steps_per_epoch or progress.step >= job.total_steps:
            break
        interval.waited += time.perf_counter() - t0
        lr = cosine_lr(progress.step, o.lr, o.warmup_steps, job.total_steps)
        result = stepper.step(batch["image"], batch["tokens"], lr)
        interval.steps += 1
        progress = Progress(
            progress.step + 1,
            progress.epoch,
            index + 1,
            progress.samples_seen + cfg.data.global_batch_size,
        )
        log_now = progress.step % cfg.tracking.log_every == 0 or progress.step in (
            1,
            job.total_steps,
        )
        save_now = progress.step % cfg.checkpoint.every_steps == 0
        if log_now or save_now:  # only here are values copied back from the device
            metrics = step_metrics(result, lr, progress)
            if log_now:
                logger.log({**metrics, **interval.rates(cfg.data.global_batch_size)}, progress.step)
            if save_now and progress.step < job.total_steps:
                _report(
                    progress,
                    metrics=metrics,
                    rank=rank,
                    model=stepper.raw,
                    tokenizer=tokenizer,
                    stepper=stepper,
                    run={**run_info, "final": False},
                )
        t0 = time.perf_counter()
    return progress
