"""The ``nightly-eval`` flow: re-evaluate the champion and the new candidates, then promote.

For each registered model (or the one named): the version under the ``champion`` alias and
every version created since the last nightly run of that model are evaluated on **the
model's own suite** (declared at registration, :mod:`clip_registry.register`; rebuilt from
the declaring version's ``eval/results.jsonl``), or on ``suite`` when one is given; the
training run's ``checkpoint/`` artifact is the model. Each evaluation is one MLflow run in the
``nightly-eval`` experiment (tags: model name, version, aliases, suite; metrics
``transfer/<dataset>/<task>/...``; the report files under ``eval/``). The registry's promotion
rule then compares each candidate with the champion on tonight's per-example results (a
paired bootstrap, :mod:`clip_registry.promote`), and a table artifact compares the versions.
A model with no declared suite (registered without an evaluation) is skipped, and said so.
Tasks that talk to MLflow retry transient (``OSError``) failures only.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from clip_eval.metrics import eval_metrics
from flows import stages
from flows.failures import one_line_failures, transient
from flows.summaries import comparison_rows, headline_metrics, rows_markdown

if TYPE_CHECKING:
    from clip_eval.suite import Suite

NIGHTLY_EXPERIMENT = "nightly-eval"
CHAMPION = "champion"
MODEL_TAG = "clipops.registered_model"
VERSION_TAG = "clipops.model_version"


@task(
    name="select-versions",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def select_versions(tracking_uri: str, model_name: str | None) -> list[dict[str, Any]]:
    """The champion and every version newer than the model's last nightly run."""
    from clip_train.tracking import tracking_client

    client = tracking_client(tracking_uri)
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


@task(
    name="download-checkpoint",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
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


@task(
    name="log-nightly-run",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def log_nightly_run(
    tracking_uri: str, version: dict[str, Any], evaluation: dict[str, Any], suite: str
) -> str:
    """One FINISHED MLflow run in the nightly experiment holding this version's evaluation."""
    from clip_train.tracking import tracking_client

    client = tracking_client(tracking_uri)
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


@task(
    name="refresh-aliases",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def refresh_aliases(tracking_uri: str, evaluated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluated versions with their aliases as they are now (after promotion)."""
    from clip_train.tracking import tracking_client

    client = tracking_client(tracking_uri)
    return [
        {**e, "aliases": sorted(client.get_model_version(e["name"], e["version"]).aliases)}
        for e in evaluated
    ]


@task(
    name="model-suite",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def model_suite(tracking_uri: str, name: str) -> Suite | None:
    """The suite model ``name`` is evaluated on (declared at registration), ``None`` if none."""
    from clip_eval.suite_identity import suite_fingerprint, suite_from_records
    from clip_registry.promote import stored_records
    from clip_registry.register import SUITE_FINGERPRINT_TAG
    from clip_train.tracking import tracking_client

    client = tracking_client(tracking_uri)
    declared = client.get_registered_model(name).tags.get(SUITE_FINGERPRINT_TAG)
    if not declared:
        return None
    for found in client.search_model_versions(f"name = '{name}'"):
        if found.tags.get(SUITE_FINGERPRINT_TAG) != declared:
            continue
        records = stored_records(client, name, str(found.version))
        if records:
            suite = suite_from_records(records)
            if suite_fingerprint(suite) == declared:
                return suite
    return None


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(  # noqa: PLR0917 - flow parameters are passed by name
    model_name: str | None = None,
    suite: str | None = None,
    tracking_uri: str | None = None,
    out_dir: str = "runs/nightly",
    promote: bool = True,
    eval_threads: int | None = 1,
) -> dict[str, Any]:
    """Evaluate the champion and new candidates on each model's suite (or ``suite``), apply
    the promotion rule, publish a table."""
    with one_line_failures():  # the failed state carries a one-line reason
        from clip_eval.suite import load_suite
        from clip_train.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        override = None if suite is None else load_suite(suite)  # a bad suite fails at once
        root = Path(out_dir) / f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
        evaluated: list[dict[str, Any]] = []
        notes: list[str] = []
        suites: dict[str, Suite | None] = {}
        for v in select_versions(uri, model_name):
            name = v["name"]
            if name not in suites:
                suites[name] = override or model_suite(uri, name)
                if suites[name] is None:
                    notes.append(f"{name}: skipped, no declared suite (register it with an eval)")
            chosen = suites[name]
            if chosen is not None:
                evaluated.append(
                    _evaluate_version(
                        uri, v, chosen, label=suite or chosen.name, root=root, threads=eval_threads
                    )
                )
        decisions = promote_versions(uri, evaluated) if promote else []
        evaluated = refresh_aliases(uri, [_without_records(e) for e in evaluated])
        rows = comparison_rows(evaluated)
        label = suite or "each model's registered suite"
        create_table_artifact(rows, key="nightly-eval", description=f"suite: {label}")
        text = rows_markdown(rows, "Nightly evaluation")
        if decisions or notes:
            text += "\n## Promotion\n\n" + "\n".join(f"- {d}" for d in decisions + notes) + "\n"
        create_markdown_artifact(text, key="nightly-eval-summary")
        for line in notes:
            print(line)
        return {
            "evaluated": evaluated,
            "decisions": decisions,
            "notes": notes,
            "out_dir": str(root),
        }


def _without_records(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "records"}  # per-example lists: large


def _evaluate_version(
    uri: str, v: dict[str, Any], suite: Suite, *, label: str, root: Path, threads: int | None
) -> dict[str, Any]:
    """Download, evaluate and log one version; its entry of the comparison."""
    from clip_registry.metrics import headline_metrics as registry_headline

    where = root / f"{v['name']}-v{v['version']}"
    ckpt = download_checkpoint(uri, v["run_id"], str(where / "download"))
    evaluation = stages.evaluate_model(
        ckpt, suite, str(where / "eval"), str(root / "feature_cache"), threads
    )
    nightly_run = log_nightly_run(uri, v, evaluation, label)
    return {
        **v,
        "nightly_run_id": nightly_run,
        "metrics": headline_metrics(evaluation["records"]),
        "registry_metrics": registry_headline(evaluation["records"]),
        "all_metrics": eval_metrics(evaluation["records"]),
        "results": evaluation["results"],
        "records": evaluation["records"],
    }


@task(
    name="promote",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient,
    cache_policy=NONE,
)
def promote_versions(tracking_uri: str, evaluated: list[dict[str, Any]]) -> list[str]:
    """The registry's promotion rule on tonight's records, candidates in version order.

    Each non-champion version evaluated tonight is compared with the champion of the moment,
    both on tonight's per-example results (a paired comparison on the same examples); the
    decision and its interval are recorded on the version by the registry.
    """
    from clip_registry.promote import apply_rule

    decisions: list[str] = []
    for name in sorted({e["name"] for e in evaluated}):
        mine = [e for e in evaluated if e["name"] == name]
        fresh = {e["version"]: e["records"] for e in mine}
        for e in sorted(mine, key=lambda e: int(e["version"])):
            if CHAMPION in e["aliases"]:
                continue
            d = apply_rule(name, version=e["version"], records=fresh, tracking_uri=tracking_uri)
            decisions.append(
                f"{name} v{d.candidate}: {d.outcome} (champion {d.champion_before or 'none'} -> "
                f"{d.champion_after or 'none'}): " + "; ".join(d.reasons)
            )
    return decisions
