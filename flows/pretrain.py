"""The ``pretrain`` flow: ingest -> validate -> train -> overlap -> evaluate -> register.

Deployments: ``pretrain/tiny`` (the CPU demo) and ``pretrain/rn50|vit-b32|vit-b16|vit-l14``
(prefect.yaml). Every stage is a task in :mod:`flows.stages` calling the CLI's entry point;
this module only wires them, names the outputs and publishes the Prefect artifacts (data
counts and quarantine, validation, training curve summary, eval table, overlap table,
registered version and alias).

Outputs of a run live under ``OUT_DIR/RUN_NAME/``: ``shards/`` (when a source is ingested),
``train/RUN_NAME/`` (Ray Train storage: checkpoints and ``final/``, unless ``storage_path``
points elsewhere, e.g. ``s3://``), ``eval/`` (results.jsonl, summary.md, plots), ``overlap/``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import stages
from flows.defaults import DEMO_RECIPE, DEMO_SOURCE
from flows.failures import one_line_failures
from flows.summaries import (
    data_markdown,
    eval_rows,
    headline_metrics,
    overlap_rows,
    registry_markdown,
    rows_markdown,
    training_markdown,
    validation_markdown,
)


def default_run_name(recipe: str) -> str:
    """``<recipe stem>-<UTC timestamp>``: unique per flow run, stable across task retries."""
    stem = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
    return f"{stem}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"


def train_overrides(
    *,
    shards: str | None,
    run_name: str,
    storage_path: str,
    ray_address: str | None,
    num_workers: int | None,
    use_gpu: bool | None,
    tracking_uri: str | None,
    extra: list[str],
) -> list[str]:
    """The ``--set`` list the flow passes to the recipe; ``extra`` (user overrides) last."""
    out = [f"infra.run_name={run_name}", f"infra.storage_path={storage_path}"]
    if shards is not None:
        out.append(f"data.shards={shards}")
    if ray_address:
        out.append(f"infra.ray_address={ray_address}")
    if num_workers is not None:
        out.append(f"infra.num_workers={num_workers}")
    if use_gpu is not None:
        out.append(f"infra.use_gpu={str(use_gpu).lower()}")
    if tracking_uri:
        out.append(f"tracking.uri={tracking_uri}")
    return out + list(extra)


def _check_prerequisites(
    source: str | None, shards: str | None, suite: str, out: Path, tracking_uri: str | None
) -> None:
    """Fail before any work when a dataset, the shards to train on, the output folder or
    MLflow is not usable."""
    from clip_train.tracking import resolve_tracking_uri
    from flows.preflight import PreflightError, Prerequisites, require

    if not source and shards and "://" not in shards and not Path(shards).is_dir():
        raise PreflightError(
            f"shards {shards} is not a directory: ingest a source first (source=...), or pass "
            "the folder of an ingested dataset"
        )
    require(Prerequisites(source, suite, str(out), resolve_tracking_uri(tracking_uri)))


def _check_run_config(recipe: str, sets: list[str]) -> None:
    """The recipe with the flow's overrides loads (unknown keys, bad values fail here)."""
    from clip_train.config import load_run_config

    load_run_config(recipe, sets)


def _data_stage(source: str | None, shards: str | None, out: Path) -> str | None:
    """Ingest (when a source is given) and validate; returns the shard location."""
    if source:
        shards = shards or str(out / "shards")
        manifest = stages.ingest_source(source, shards)
        create_markdown_artifact(
            data_markdown(manifest, shards), key="pretrain-data", description="ingest counts"
        )
    if shards is None or "://" in shards:
        return shards  # the recipe's shards, or remote shards validated where they were made
    report = stages.validate_shards(shards)
    create_markdown_artifact(
        validation_markdown(report["success"], report["summary"], report["failures"]),
        key="pretrain-validation",
        description="Great Expectations validation of the shards",
    )
    if not report["success"]:
        raise stages.validation_error(report)
    return shards


def _publish_eval(evaluation: dict[str, Any], trained: dict[str, Any]) -> None:
    rows = eval_rows(evaluation["records"])
    create_table_artifact(rows, key="pretrain-eval", description="evaluation suite results")
    create_markdown_artifact(
        rows_markdown(rows, f"Evaluation of {trained['run_name']}"),
        key="pretrain-eval-summary",
        description=f"results: {evaluation['results']}",
    )


def _overlap_stage(
    shards: str, suite: str, model_dir: str, out: Path, detector: str | None, *, verify: str
) -> dict[str, Any]:
    where = str(out / "overlap")
    report = stages.overlap_analysis(shards, suite, model_dir, where, detector, verify=verify)
    create_table_artifact(  # contamination counts only calibrated or verified overlaps
        overlap_rows(report),
        key="pretrain-overlap",
        description=f"train/eval overlap (status: {report.get('status', '-')})",
    )
    return report


def _register_stage(
    trained: dict[str, Any], model_name: str | None, out: Path, overlap_report: str | None
) -> dict[str, Any]:
    registered = stages.register_model(
        trained["mlflow_run_id"],
        name=model_name,
        eval_dir=str(out / "eval"),
        overlap_report=overlap_report,
        tracking_uri=trained["tracking_uri"],
    )
    create_markdown_artifact(
        registry_markdown(registered), key="pretrain-registry", description="MLflow registry"
    )
    return registered


@flow(name="pretrain", log_prints=True)
def pretrain(  # noqa: PLR0917 - flow parameters are passed by name
    recipe: str = DEMO_RECIPE,
    source: str | None = DEMO_SOURCE,
    shards: str | None = None,
    suite: str = "default",
    ray_address: str | None = None,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    overrides: list[str] | None = None,
    out_dir: str = "runs/pretrain",
    run_name: str | None = None,
    model_name: str | None = None,
    eval_threads: int | None = 1,
    overlap: bool = True,
    overlap_detector: str | None = None,
    overlap_verify: Literal["auto", "on", "off"] = "auto",
    registry: bool = True,
) -> dict[str, Any]:
    """Pretrain a CLIP from a data source (or existing shards) to a registered candidate.

    Args:
        recipe: training recipe name (``tiny``, ``vit-l14``...) or run-config YAML path.
        source: data source to ingest (``None``: train on ``shards`` or the recipe's shards).
        shards: where the shards are (or go); default ``OUT_DIR/RUN_NAME/shards``.
        suite: evaluation suite YAML (``default``: the bundled suite).
        ray_address: existing Ray cluster (``auto``, ``ray://head:10001``); none: local.
        num_workers, use_gpu: Ray Train scaling (``None``: the recipe's).
        storage_path: Ray Train storage (local or ``s3://``); default under the run dir.
        tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db).
        overrides: extra ``section.key=value`` overrides of the recipe.
        out_dir: root of the run directories.
        run_name: training run name (default ``<recipe>-<UTC time>``).
        model_name: registered model name (default: derived from the model config).
        eval_threads: torch threads for evaluation (1 is fastest on a busy small machine).
        overlap: run the overlap analysis of the shards against the suite's datasets.
        overlap_detector: ``None``: the CLIP image tower finds duplicates; ``"train"``: train
            the tiny dedicated detector on the shards first; else a trained detector dir.
        overlap_verify: pixel verification of the detector's candidates: ``auto`` (on with a
            detector), ``on`` or ``off`` (``clipops overlap --verify``). Unverified and not
            calibrated on planted copies, candidates are reported as unverified (status in
            the overlap table), never as contamination.
        registry: register the model (``candidate`` alias, then the champion rule).
    """
    with one_line_failures():  # the failed state carries a one-line reason
        name = run_name or default_run_name(recipe)
        out = Path(out_dir) / name
        _check_prerequisites(source, shards, suite, out, tracking_uri)
        planned = shards or (str(out / "shards") if source else None)
        sets = train_overrides(
            shards=planned,
            run_name=name,
            storage_path=storage_path or str(out / "train"),
            ray_address=ray_address,
            num_workers=num_workers,
            use_gpu=use_gpu,
            tracking_uri=tracking_uri,
            extra=list(overrides or []),
        )
        _check_run_config(recipe, sets)  # a config error fails now, before ingest
        shard_dir = _data_stage(source, shards, out)
        trained = stages.train_model(recipe, sets)
        curve = stages.loss_curve(trained["tracking_uri"], trained["mlflow_run_id"])
        create_markdown_artifact(
            training_markdown(trained, curve), key="pretrain-training", description="training run"
        )
        model_dir = stages.local_model(trained["final_model"], str(out / "model"))
        report = None
        if overlap and shard_dir is not None:
            report = _overlap_stage(
                shard_dir, suite, model_dir, out, overlap_detector, verify=overlap_verify
            )
        evaluation = stages.evaluate_model(
            model_dir, suite, str(out / "eval"), str(out / "feature_cache"), eval_threads
        )
        stages.log_eval(trained["tracking_uri"], trained["mlflow_run_id"], evaluation)
        _publish_eval(evaluation, trained)
        overlap_path = None if report is None else str(report["report_path"])
        registered = _register_stage(trained, model_name, out, overlap_path) if registry else None
        return {
            "run_name": name,
            "run_dir": str(out),
            "shards": shard_dir,
            "final_model": trained["final_model"],
            "mlflow_run_id": trained["mlflow_run_id"],
            "tracking_uri": trained["tracking_uri"],
            "eval_results": evaluation["results"],
            "eval_summary": evaluation["summary"],
            "headline": headline_metrics(evaluation["records"]),
            "overlap_report": overlap_path,
            "registered": registered,
        }
