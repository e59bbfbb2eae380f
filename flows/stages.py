"""The pipeline stages as Prefect tasks: each calls the same entry point as the ``clipops`` CLI.

No maths here: ``ingest`` is :func:`clip_data.ingest.ingest`, ``validate`` is
:func:`clip_data.validate.validate_dataset`, ``train`` is :func:`clip_train.run.train`,
``evaluate`` is :func:`clip_eval.suite.run_suite` + :func:`clip_eval.report.write_report`.
Tasks that touch storage, servers or the Ray cluster retry transient failures only (I/O, a
lost Ray worker: :func:`flows.failures.transient`); a deterministic failure (bad data, bad
config, an unreachable tracking server) fails at once. Heavy libraries
are imported inside the tasks.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NONE

from clip_eval.metrics import eval_metrics
from flows.failures import transient

if TYPE_CHECKING:
    from clip_eval.suite import Suite


def stdout_and_run_log() -> Callable[[str], None]:
    """A ``log`` for the current task that any thread may call: each line goes to stdout and,
    through Prefect's API handler alone (not its console handler), to the task run's logs."""
    from prefect.logging import get_run_logger
    from prefect.logging.handlers import APILogHandler

    run_logger = get_run_logger()
    api_only = logging.getLogger("clipops.flows.progress")
    if not any(isinstance(h, APILogHandler) for h in api_only.handlers):
        api_only.addHandler(APILogHandler())
        api_only.setLevel(logging.INFO)
        api_only.propagate = False
    adapter = logging.LoggerAdapter(api_only, dict(getattr(run_logger, "extra", {}) or {}))

    def log(line: str) -> None:
        sys.stdout.write(line + "\n")  # not print(): Prefect's log_prints would log it twice
        sys.stdout.flush()
        adapter.info(line)

    return log


@task(
    name="ingest",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def ingest_source(
    source: str, dest: str, workers: int = 2, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``clipops ingest SOURCE DEST``: Parquet shards + quarantine + manifest; the manifest."""
    from clip_data.ingest import IngestConfig, ingest

    manifest = ingest(source, dest, IngestConfig(workers=workers), progress=None, **(options or {}))
    return dict(manifest)


class ValidationFailedError(RuntimeError):
    """The Great Expectations suite failed on the ingested shards: nothing is trained."""


def validation_error(report: dict[str, Any]) -> ValidationFailedError:
    """The one-line error of a failed validation: its head line and the failing checks."""
    head = str(report["summary"]).splitlines()[0]
    names = [
        f"{f['name']}({f['column']})" if f.get("column") else f["name"] for f in report["failures"]
    ]
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return ValidationFailedError(f"{head}; failing: {', '.join(names[:5])}{more}")


@task(name="validate", cache_policy=NONE)
def validate_shards(dest: str) -> dict[str, Any]:
    """``clipops validate DEST``: ``success``, ``rows``, ``summary`` and the failing checks."""
    from clip_data.validate import validate_dataset

    report = validate_dataset(dest)
    return {
        "success": report.success,
        "rows": report.rows,
        "summary": report.summary(),
        "failures": report.failures,
    }


@task(
    name="train",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient,  # a lost Ray worker or node, not a config or data error
    cache_policy=NONE,
)
def train_model(recipe: str, overrides: list[str]) -> dict[str, Any]:
    """``clipops train --config RECIPE --set ...`` on Ray Train; a retry resumes the run.

    A local Ray cluster started here is shut down afterwards, so the next stages get the CPUs.
    """
    import ray

    from clip_train.config import load_run_config
    from clip_train.run import train
    from clip_train.tracking import resolve_tracking_uri

    cfg = load_run_config(recipe, overrides)
    started_here = not ray.is_initialized()
    try:
        result = train(cfg, log=stdout_and_run_log())
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    return {
        "run_name": cfg.infra.run_name,
        "model": cfg.model.name,
        "run_dir": result.run_dir,
        "final_model": result.final_model,
        "steps": result.steps,
        "samples_seen": result.samples_seen,
        "mlflow_run_id": result.mlflow_run_id,
        "tracking_uri": resolve_tracking_uri(cfg.tracking.uri),
        "dataset_version": result.dataset_version,
    }


def local_model(final_model: str, dest: str) -> str:
    """A local directory holding the checkpoint at ``final_model`` (downloaded if a URI)."""
    if "://" not in final_model or final_model.startswith("file://"):
        return final_model.removeprefix("file://")
    import fsspec

    fs, path = fsspec.core.url_to_fs(final_model)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", dest, recursive=True)
    return dest


@task(
    name="loss-curve",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def loss_curve(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    """``(step, train/loss)`` pairs logged by rank 0 to the MLflow run."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")
    return sorted((int(m.step), float(m.value)) for m in history)


@task(name="evaluate", cache_policy=NONE)
def evaluate_model(
    model: str,
    suite: str | Suite,
    out_dir: str,
    cache_dir: str | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """``clipops eval --model CKPT --suite SUITE --out DIR``: records + report files
    (``suite``: a suite file, or a suite already loaded, e.g. a registered model's own)."""
    from clip_eval.report import write_report
    from clip_eval.suite import Suite, load_suite, run_suite

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    parsed = suite if isinstance(suite, Suite) else load_suite(suite)
    records = run_suite(model, parsed, cache_dir=cache_dir, progress=None)
    written = write_report(records, out_dir)
    return {
        "records": records,
        "results": str(written["results"]),
        "summary": str(written["summary"]),
        "plots": [str(p) for p in written["plots"]],
        "plots_error": written["plots_error"],
    }


@task(
    name="log-eval-to-mlflow",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def log_eval(tracking_uri: str, run_id: str, evaluation: dict[str, Any]) -> dict[str, float]:
    """Log the suite's scalar metrics and report files (under ``eval/``) to an MLflow run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    metrics = eval_metrics(evaluation["records"])
    import time

    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500], synchronous=True)
    files = [evaluation["results"], evaluation["summary"], *evaluation["plots"]]
    for path in files:
        client.log_artifact(run_id, path, "eval")
    return metrics


@task(name="overlap", cache_policy=NONE)
def overlap_analysis(
    shards: str,
    suite: str,
    model: str,
    out_dir: str,
    detector: str | None = None,
    *,
    verify: str = "auto",
) -> dict[str, Any]:
    """``clipops overlap --train SHARDS --suite SUITE --model CKPT --out DIR [--detector D]
    [--verify auto|on|off]``.

    ``detector`` ``None`` uses the CLIP image tower as the duplicate detector; ``"train"``
    first trains the tiny dedicated detector on the shards (``clipops overlap-detector
    --tiny``) into ``OUT_DIR/detector``; anything else is a trained detector directory.
    ``verify``: the pixel verification of candidates (``auto``: on with a detector). The
    report's ``status`` (:mod:`clip_overlap.status`) says what its contamination counts:
    without a calibrated detector only exact duplicates, the rest ``unverified_candidates``.
    """
    from clip_overlap.pipeline import OverlapConfig, run_overlap

    config = OverlapConfig(verify=verify)  # OverlapError for an unknown mode, before any work

    if detector == "train":
        from clip_overlap.detector import DetectorTrainConfig, train_detector

        detector = str(train_detector(shards, f"{out_dir}/detector", DetectorTrainConfig.tiny()))
    report = run_overlap(
        shards,
        suite,
        model,
        out_dir,
        detector=detector,
        embedding="clip" if detector is None else "detector",
        config=config,
    )
    report["report_path"] = f"{out_dir}/overlap.json"
    return report


@task(
    name="register",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def register_model(
    run_id: str,
    *,
    name: str | None,
    eval_dir: str,
    overlap_report: str | None,
    tracking_uri: str,
) -> dict[str, Any]:
    """``clipops register --run RUN_ID``: a new version with ``candidate``; the champion rule."""
    from clip_registry.register import register_run

    reg = register_run(
        run_id,
        name=name,
        eval_dir=eval_dir,
        overlap_report=overlap_report,
        tracking_uri=tracking_uri,
    )
    return {
        "name": reg.name,
        "version": reg.version,
        "aliases": list(reg.aliases),
        "model_uri": reg.model_uri,
        "created": reg.created,
        "outcome": reg.decision.outcome,
        "champion_before": reg.decision.champion_before,
        "champion_after": reg.decision.champion_after,
        "reasons": list(reg.decision.reasons),
    }


def scratch_dir(prefix: str) -> str:
    """A fresh temporary directory (for downloads that need not outlive the flow)."""
    return tempfile.mkdtemp(prefix=prefix)
