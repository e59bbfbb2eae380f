"""The ``ingest`` and ``evaluate`` flows, for ad-hoc use outside the pretrain chain.

``prefect deployment run ingest/adhoc --param source=s3://bucket/raw --param dest=...`` and
``prefect deployment run evaluate/adhoc --param model=CKPT``; the same tasks as the pretrain
flow, with the same artifacts.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import stages
from flows.failures import one_line_failures
from flows.summaries import data_markdown, eval_rows, rows_markdown, validation_markdown


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, dest: str, workers: int = 2) -> dict[str, Any]:
    """Ingest ``source`` into validated Parquet shards at ``dest``; fails if validation does."""
    with one_line_failures():  # the failed state carries a one-line reason
        manifest = stages.ingest_source(source, dest, workers)
        create_markdown_artifact(data_markdown(manifest, dest), key="ingest-data")
        report = stages.validate_shards(dest)
        create_markdown_artifact(
            validation_markdown(report["success"], report["summary"], report["failures"]),
            key="ingest-validation",
        )
        if not report["success"]:
            raise stages.validation_error(report)
        return {"dest": dest, "counts": manifest["counts"], "rows": report["rows"]}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(  # noqa: PLR0917 - flow parameters are passed by name
    model: str,
    suite: str = "default",
    out_dir: str = "runs/eval",
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run an eval suite on a checkpoint; with ``mlflow_run_id``, log it to that run too."""
    with one_line_failures():  # the failed state carries a one-line reason
        from clip_train.tracking import resolve_tracking_uri

        local = stages.local_model(model, f"{out_dir}/model")
        evaluation = stages.evaluate_model(
            local, suite, out_dir, f"{out_dir}/feature_cache", threads
        )
        rows = eval_rows(evaluation["records"])
        create_table_artifact(rows, key="evaluate-results")
        create_markdown_artifact(
            rows_markdown(rows, f"Evaluation of {model}"), key="evaluate-summary"
        )
        if mlflow_run_id:
            stages.log_eval(resolve_tracking_uri(tracking_uri), mlflow_run_id, evaluation)
        return {"results": evaluation["results"], "summary": evaluation["summary"]}
