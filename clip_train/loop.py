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
from clip_train.data import shuffle_seed
from clip_train.device_check import check_device, current_device_info
from clip_train.optim import build_optimizer, cosine_lr
from clip_train.state import (
    LoadedTrainState,
    Progress,
    check_compatible,
    load_train_state,
    save_rng,
    save_train_state,
)
from clip_train.step import Stepper, compile_model
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
    optimizer = build_optimizer(model, o.lr, o.weight_decay, betas, o.eps, implementation=o.adamw)
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


def _train_epoch(
    cfg: RunConfig,
    *,
    job: JobSpec,
    shard: Any,
    stepper: Stepper,
    progress: Progress,
    rank: int,
    local_batch: int,
    logger: StepLogger,
    tokenizer: ClipTokenizer,
    run_info: dict[str, Any],
) -> Progress:
    """Train the rest of ``progress.epoch``; returns the progress at its end."""
    batches = shard.iter_torch_batches(
        batch_size=local_batch,
        drop_last=True,
        prefetch_batches=4,  # keep decoded batches ready across row-group boundaries
        local_shuffle_buffer_size=cfg.data.shuffle_buffer,
        local_shuffle_seed=shuffle_seed(cfg.seed, progress.epoch, rank),
        device=stepper.device,
    )
    skip, o = progress.batch_in_epoch, cfg.optim
    waited, t0 = 0.0, time.perf_counter()
    for index, batch in enumerate(batches):
        if index < skip:
            t0 = time.perf_counter()
            continue
        if index >= job.steps_per_epoch or progress.step >= job.total_steps:
            break
        waited = time.perf_counter() - t0
        lr = cosine_lr(progress.step, o.lr, o.warmup_steps, job.total_steps)
        result = stepper.step(batch["image"], batch["tokens"], lr)
        elapsed = time.perf_counter() - t0
        progress = Progress(
            progress.step + 1,
            progress.epoch,
            index + 1,
            progress.samples_seen + cfg.data.global_batch_size,
        )
        metrics = {
            "train/loss": result.loss,
            "train/lr": lr,
            "train/logit_scale": result.logit_scale,
            "train/pairs_per_s": cfg.data.global_batch_size / max(elapsed, 1e-9),
            "train/data_wait_fraction": waited / max(elapsed, 1e-9),
            "train/epoch": float(progress.epoch),
            "train/samples_seen": float(progress.samples_seen),
        }
        if result.grad_norm is not None:
            metrics["train/grad_norm"] = result.grad_norm
        if progress.step % cfg.tracking.log_every == 0 or progress.step in (1, job.total_steps):
            logger.log(metrics, progress.step)
        if progress.step % cfg.checkpoint.every_steps == 0 and progress.step < job.total_steps:
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
