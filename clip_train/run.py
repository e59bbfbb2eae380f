"""The pretraining driver: resolve the run, start (or join) Ray, fit, publish the result.

``train(cfg)`` is what ``clipops train`` and the pretrain flow call. It reads the ingest
manifest, fixes the tokenizer (trained once on the captions and stored beside the run, or
taken from ``init_from``/``tokenizer_merges``), opens the MLflow run, and runs a
``TorchTrainer`` whose workers execute ``clip_train.loop.train_loop_per_worker``. Running the
same config again with the same ``infra.run_name`` and ``infra.storage_path`` resumes from
the latest checkpoint; a worker that dies is replaced and training resumes from the latest
checkpoint, up to ``infra.max_failures`` times.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from clip_core.checkpoint import CheckpointError, load_checkpoint
from clip_core.registry import get_model_config
from clip_core.tokenizer import ClipTokenizer
from clip_train.config import RunConfig, RunConfigError
from clip_train.data import (
    DataError,
    manifest_units,
    read_captions,
    read_manifest_any,
    shard_urls,
    split_rows,
)
from clip_train.device_check import DeviceError
from clip_train.loop import JobSpec, epoch_dataset, train_loop_per_worker
from clip_train.progress import ProgressReporter
from clip_train.provenance import code_version, seed_everything
from clip_train.state import TrainCheckpointError, load_train_state
from clip_train.tracking import TrackingTarget, experiment_name, open_run, resolve_tracking_uri

TOKENIZER_FILE = "tokenizer-merges.txt.gz"
FINAL_DIR = "final"


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: str  # storage_path/run_name
    final_model: str  # clip_core checkpoint of the final weights (path or URI)
    steps: int
    samples_seen: int
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    dataset_version: str | None


def absolute_uri(path: str) -> str:
    """A URI unchanged, a local path made absolute (Ray workers chdir elsewhere)."""
    return path if "://" in path else str(Path(path).resolve())


def storage_root(cfg: RunConfig) -> str:
    """``infra.storage_path`` as an absolute path or URI."""
    return absolute_uri(cfg.infra.storage_path)


def _run_dir(cfg: RunConfig) -> str:
    return f"{storage_root(cfg).rstrip('/')}/{cfg.infra.run_name}"


def resolve_tokenizer(cfg: RunConfig, urls: list[str], context_length: int) -> ClipTokenizer:
    """The run's tokenizer: from init_from, a merges file, a previous attempt, or trained."""
    m = cfg.model
    if m.init_from:
        tok = load_checkpoint(m.init_from).tokenizer
        if tok is None:
            raise CheckpointError(f"{m.init_from}: checkpoint has no tokenizer")
        return tok
    if m.tokenizer_merges:
        return ClipTokenizer.from_merges_file(m.tokenizer_merges, context_length=context_length)
    stored = f"{_run_dir(cfg)}/{TOKENIZER_FILE}"
    fs, path = fsspec.core.url_to_fs(stored)
    with tempfile.TemporaryDirectory(prefix="clipops-tok-") as tmp:
        local = Path(tmp) / TOKENIZER_FILE
        if fs.exists(path):  # a previous attempt of this run: keep its vocabulary
            fs.get_file(path, str(local))
            return ClipTokenizer.from_merges_file(local, context_length=context_length)
        captions = read_captions(urls, cfg.data.split, m.tokenizer_sample)
        tok = ClipTokenizer.train(captions, m.tokenizer_vocab_size, context_length=context_length)
        tok.save(local)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local), path)
    return tok


def _model_config(cfg: RunConfig, vocab_size: int) -> dict[str, Any]:
    base = get_model_config(cfg.model.name)
    vision = dict(cfg.model.vision)
    if cfg.model.image_size is not None:
        vision["image_size"] = cfg.model.image_size
    return base.replace(vision=vision, text={**cfg.model.text, "vocab_size": vocab_size}).to_dict()


def _validate_inputs(cfg: RunConfig, resume_from: str | None) -> None:
    """Fail before starting Ray when a given checkpoint is unusable (error names the file)."""
    if cfg.model.init_from:
        try:
            load_checkpoint(cfg.model.init_from)
        except (CheckpointError, ValueError, OSError) as exc:
            raise TrainCheckpointError(f"model.init_from {cfg.model.init_from}: {exc}") from exc
    if resume_from:
        load_train_state(resume_from)


def plan(cfg: RunConfig, resume_from: str | None = None) -> tuple[JobSpec, list[str], str | None]:
    """Resolve data, tokenizer, model config and step counts (no Ray, no tracking)."""
    if cfg.precision.channels_last and get_model_config(cfg.model.name).vision.type != "resnet":
        raise RunConfigError(
            f"precision.channels_last applies to ResNet image towers; {cfg.model.name} is a ViT"
        )
    _validate_inputs(cfg, resume_from)
    shards = absolute_uri(cfg.data.shards)  # Ray workers run in another directory
    manifest = read_manifest_any(shards)
    urls = shard_urls(shards, manifest)
    rows = split_rows(manifest, cfg.data.split)
    steps_per_epoch = rows // cfg.data.global_batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"{cfg.data.shards}: split {cfg.data.split!r} has {rows} rows, fewer than one "
            f"global batch ({cfg.data.global_batch_size})"
        )
    total = cfg.optim.max_steps or steps_per_epoch * cfg.optim.epochs
    context = get_model_config(cfg.model.name).text.context_length
    tok = resolve_tokenizer(cfg, urls, context)
    version = manifest.get("dataset_version", {}).get("dvc_md5")
    job = JobSpec(
        model_config=_model_config(cfg, tok.vocab_size),
        merges=list(tok.merges),
        context_length=tok.context_length,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        tracking=None,
        init_from=cfg.model.init_from,
        resume_from=resume_from,
        shards=shards,
    )
    return job, urls, version


def _tracking(cfg: RunConfig, version: str | None) -> TrackingTarget:
    tags = {
        "clipops.model": cfg.model.name,
        "clipops.dataset_version": version or "unknown",
        "clipops.data": cfg.data.shards,
        "mlflow.source.git.commit": code_version(),
        "clipops.seed": str(cfg.seed),
    }
    return open_run(
        resolve_tracking_uri(cfg.tracking.uri),
        experiment_name(cfg.model.name, cfg.tracking.experiment),
        cfg.infra.run_name,
        cfg.flat_params(),
        tags,
    )


def training_dataset(
    cfg: RunConfig,
    job: JobSpec,
    urls: list[str],
    *,
    image_size: int | None = None,
    preprocess_cpus: float | None = None,
) -> Any:
    """The run's Ray Data pipeline over ``urls`` (``plan``'s output); ``image_size`` and
    ``preprocess_cpus`` default to the model's resolution and ``data.preprocess_cpus``."""
    units = manifest_units(urls, read_manifest_any(absolute_uri(cfg.data.shards)))
    return epoch_dataset(
        cfg, job, urls, units, image_size=image_size, preprocess_cpus=preprocess_cpus
    )


def _trainer(cfg: RunConfig, job: JobSpec, dataset: Any) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    infra = cfg.infra
    resources = {"CPU": infra.cpus_per_worker}
    if infra.use_gpu:
        resources["GPU"] = infra.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict(), "job": job.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=infra.num_workers,
            use_gpu=infra.use_gpu,
            resources_per_worker=resources,
            accelerator_type=infra.accelerator_type,  # one GPU type per run
        ),
        run_config=RayRunConfig(
            name=infra.run_name,
            storage_path=storage_root(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=infra.max_failures),
        ),
        datasets={"train": dataset},
    )


def _root_cause(exc: BaseException) -> BaseException | None:
    """The first TrainCheckpointError/DataError/DeviceError in an exception chain (Ray wraps
    them)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, TrainCheckpointError | DataError | DeviceError):
            return cur
        stack += [cur.__cause__, cur.__context__, *getattr(cur, "exceptions", [])]
        stack += list(getattr(cur, "worker_failures", {}).values())
    return None


#: Ray features a local, one-machine cluster has no use for, and their cost: prestarted idle
#: worker processes, Train's preemption watcher (node draining) and Train's Prometheus
#: metrics. ~17 CPU-s less per training start (BENCHMARKS.md, "Test suite"); a cluster that is
#: joined (``infra.ray_address``) is left as its operator configured it.
LOCAL_CLUSTER_ENV = {
    "RAY_prestart_worker_first_driver": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


class ClusterError(RuntimeError):
    """The configured Ray cluster cannot be joined (address, token authentication)."""


def _connect(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """Start a local Ray cluster, or join ``infra.ray_address`` (token from the environment)."""
    import ray

    if ray.is_initialized():
        return
    where = cfg.infra.ray_address
    if not where:
        for key, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)  # the environment wins: set one to turn it back on
    try:
        ray.init(
            address=where or "local",  # never join a stranger's cluster by accident
            num_cpus=None if where else cfg.infra.local_cpus,
            log_to_driver=False,
        )
    except (RuntimeError, ConnectionError, ray.exceptions.RayError) as exc:
        if not where:
            raise
        chain: list[BaseException] = [exc]
        while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None:
            chain.append(nxt)
        text = " ".join(str(e) for e in chain)
        hint = (
            "the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(or RAY_AUTH_TOKEN_PATH) to the cluster's token"
            if "AuthToken" in text or "AuthenticationError" in text
            else (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        )
        raise ClusterError(f"cannot join the Ray cluster at {where}: {hint}") from None
    cpus = ray.cluster_resources().get("CPU", 0)
    log(
        f"connected to Ray cluster at {where} ({cpus:g} CPUs)"
        if where
        else f"started a local Ray cluster ({cpus:g} logical CPUs)"
    )


def train(
    cfg: RunConfig, resume_from: str | None = None, log: Callable[[str], None] = print
) -> TrainResult:
    """Pretrain ``cfg`` on Ray Train; resumes a previous attempt with the same run name."""
    seed_everything(cfg.seed)
    job, urls, version = plan(cfg, resume_from)
    _connect(cfg, log)
    target = _tracking(cfg, version)
    job = JobSpec(**{**job.__dict__, "tracking": target})
    log(
        f"run {cfg.infra.run_name}: {job.total_steps} steps ({job.steps_per_epoch}/epoch), "
        f"{cfg.infra.num_workers} workers x batch {cfg.per_worker_batch}, "
        f"mlflow run {target.run_id}"
    )
    dataset = training_dataset(cfg, job, urls)
    reporter = ProgressReporter(
        target,
        total_steps=job.total_steps,
        steps_per_epoch=job.steps_per_epoch,
        global_batch=cfg.data.global_batch_size,
        every_steps=cfg.tracking.progress_every,
        every_seconds=cfg.tracking.progress_seconds,
        log=log,
    )
    try:
        with reporter:
            result = _trainer(cfg, job, dataset).fit()
    except Exception as exc:
        from clip_train.tracking import finish_run

        finish_run(target, "FAILED", {})
        cause = _root_cause(exc)
        if cause is not None:
            raise cause from exc
        raise
    return _publish(cfg, job=job, target=target, result=result, version=version, log=log)


def _publish(
    cfg: RunConfig,
    *,
    job: JobSpec,
    target: TrackingTarget,
    result: Any,
    version: str | None,
    log: Callable[[str], None],
) -> TrainResult:
    from clip_train.tracking import finish_run

    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.infra.run_name} finished without a checkpoint")
    final_uri = f"{_run_dir(cfg)}/{FINAL_DIR}"
    with tempfile.TemporaryDirectory(prefix="clipops-final-") as tmp:
        with result.checkpoint.as_directory() as directory:
            state = load_train_state(directory)
            local_final = Path(tmp) / FINAL_DIR
            shutil.copytree(Path(directory) / "model", local_final)
        fs, path = fsspec.core.url_to_fs(final_uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.put(str(local_final), path, recursive=True)
        finish_run(target, "FINISHED", {"checkpoint": local_final})
    log(f"finished {state.progress.step} steps; final model {final_uri}")
    return TrainResult(
        run_dir=_run_dir(cfg),
        final_model=final_uri,
        steps=state.progress.step,
        samples_seen=state.progress.samples_seen,
        metrics=dict(result.metrics or {}),
        mlflow_run_id=target.run_id,
        dataset_version=version,
    )
