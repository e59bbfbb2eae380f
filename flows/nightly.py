"""The ``nightly-eval`` flow: re-evaluate the champion and the new candidates, then promote.

For each registered model (or the one named): the version under the ``champion`` alias and
every version created since the last nightly run of that model are evaluated on the suite
(the training run's ``checkpoint/`` artifact is the model). Each evaluation is one MLflow run
in the ``nightly-eval`` experiment (tags: model name, version, aliases; metrics
``eval/<dataset>/<task>/...``; the report files under ``eval/``); the promotion rule of the
registry then decides the champion, and a table artifact compares the versions.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from clip_eval.metrics import eval_metrics
from flows import stages
from flows.summaries import comparison_rows, headline_metrics, rows_markdown

NIGHTLY_EXPERIMENT = "nightly-eval"
CHAMPION = "champion"
MODEL_TAG = "clipops.registered_model"
VERSION_TAG = "clipops.model_version"


@task(name="select-versions", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def select_versions(tracking_uri: str, model_name: str | None) -> list[dict[str, Any]]:
    """The champion and every version newer than the model's last nightly run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    names = [model_name] if model_name else [m.name for m in client.search_registered_models()]
    exp = client.get_experiment_by_name(NIGHTLY_EXPERIMENT)
    chosen: list[dict[str, Any]] = []
    for name in names:
        last = 0
        if exp is not None:
            runs = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{MODEL_TAG}` = '{name}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            last = int(runs[0].info.start_time) if runs else 0
        for found in client.search_model_versions(f"name = '{name}'"):
            v = client.get_model_version(name, found.version)  # search omits the aliases
            aliases = sorted(v.aliases or [])
            if CHAMPION in aliases or int(v.creation_timestamp) > last:
                chosen.append(
                    {
                        "name": name,
                        "version": str(v.version),
                        "run_id": v.run_id,
                        "aliases": aliases,
                    }
                )
    return sorted(chosen, key=lambda c: (c["name"], int(c["version"])))


@task(name="download-checkpoint", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def download_checkpoint(tracking_uri: str, run_id: str, dest: str) -> str:
    """The training run's ``checkpoint/`` artifact (a clip_core checkpoint) in ``dest``."""
    import mlflow.artifacts

    from clip_train.tracking import prefer_proxied_artifact_downloads

    prefer_proxied_artifact_downloads()
    Path(dest).mkdir(parents=True, exist_ok=True)
    return str(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="checkpoint", dst_path=dest, tracking_uri=tracking_uri
        )
    )


@task(name="log-nightly-run", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def log_nightly_run(
    tracking_uri: str, version: dict[str, Any], evaluation: dict[str, Any], suite: str
) -> str:
    """One FINISHED MLflow run in the nightly experiment holding this version's evaluation."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(NIGHTLY_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(NIGHTLY_EXPERIMENT)
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    run = client.create_run(
        exp_id,
        run_name=f"{version['name']}-v{version['version']}-{stamp}",
        tags={
            MODEL_TAG: version["name"],
            VERSION_TAG: version["version"],
            "clipops.aliases": ",".join(version["aliases"]),
            "clipops.training_run": version["run_id"],
            "clipops.suite": suite,
        },
    )
    run_id = str(run.info.run_id)
    stages.log_eval.fn(tracking_uri, run_id, evaluation)
    client.set_terminated(run_id, "FINISHED")
    return run_id


@task(name="refresh-aliases", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def refresh_aliases(tracking_uri: str, evaluated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluated versions with their aliases as they are now (after promotion)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return [
        {**e, "aliases": sorted(client.get_model_version(e["name"], e["version"]).aliases)}
        for e in evaluated
    ]


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(  # noqa: PLR0917 - flow parameters are passed by name
    model_name: str | None = None,
    suite: str = "default",
    tracking_uri: str | None = None,
    out_dir: str = "runs/nightly",
    promote: bool = True,
    eval_threads: int | None = 1,
) -> dict[str, Any]:
    """Evaluate the champion and new candidates, apply the promotion rule, publish a table."""
    from clip_registry.metrics import headline_metrics as registry_headline
    from clip_train.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    root = Path(out_dir) / f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    evaluated: list[dict[str, Any]] = []
    for v in select_versions(uri, model_name):
        where = root / f"{v['name']}-v{v['version']}"
        ckpt = download_checkpoint(uri, v["run_id"], str(where / "download"))
        evaluation = stages.evaluate_model(
            ckpt, suite, str(where / "eval"), str(root / "feature_cache"), eval_threads
        )
        nightly_run = log_nightly_run(uri, v, evaluation, suite)
        evaluated.append(
            {
                **v,
                "nightly_run_id": nightly_run,
                "metrics": headline_metrics(evaluation["records"]),
                "registry_metrics": registry_headline(evaluation["records"]),
                "all_metrics": eval_metrics(evaluation["records"]),
                "results": evaluation["results"],
            }
        )
    decisions = promote_versions(uri, evaluated) if promote else []
    evaluated = refresh_aliases(uri, evaluated)
    rows = comparison_rows(evaluated)
    create_table_artifact(rows, key="nightly-eval", description=f"suite {suite}")
    text = rows_markdown(rows, "Nightly evaluation")
    if decisions:
        text += "\n## Promotion\n\n" + "\n".join(f"- {d}" for d in decisions) + "\n"
    create_markdown_artifact(text, key="nightly-eval-summary")
    return {"evaluated": evaluated, "decisions": decisions, "out_dir": str(root)}


@task(name="promote", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def promote_versions(tracking_uri: str, evaluated: list[dict[str, Any]]) -> list[str]:
    """The registry's promotion rule on tonight's metrics, candidates in version order.

    Each non-champion version evaluated tonight is compared with the champion of the moment
    (both on tonight's metrics); the decision is recorded on the version by the registry.
    """
    from clip_registry.promote import apply_rule

    decisions: list[str] = []
    for name in sorted({e["name"] for e in evaluated}):
        mine = [e for e in evaluated if e["name"] == name]
        fresh = {e["version"]: e["registry_metrics"] for e in mine}
        for e in sorted(mine, key=lambda e: int(e["version"])):
            if CHAMPION in e["aliases"]:
                continue
            d = apply_rule(name, version=e["version"], metrics=fresh, tracking_uri=tracking_uri)
            decisions.append(
                f"{name} v{d.candidate}: {d.outcome} (champion {d.champion_before or 'none'} -> "
                f"{d.champion_after or 'none'}): " + "; ".join(d.reasons)
            )
    return decisions
