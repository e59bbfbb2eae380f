"""Register a finished pretraining run as a new version of a named MLflow model.

:func:`register_run` (what ``clipops register`` and the pretrain flow call):

1. reads the run (it must be FINISHED) and its ``checkpoint/`` artifact (a clip_core
   checkpoint), checks that the checkpoint loads;
2. links the evaluation (``clipops eval --out DIR``: ``results.jsonl``, ``summary.md``, PNGs;
   the feature cache is left out) and the overlap report to the run as artifacts ``eval/`` and
   ``overlap/``, and logs the eval metrics to the run at the final step under the flows' names,
   ``transfer/<dataset>/<task>/...`` (:func:`clip_eval.metrics.eval_metrics`);
3. logs the checkpoint as a pyfunc model of the run (:mod:`clip_registry.logged`) and
   registers it, unless a version of this run already exists (registration is safe to rerun:
   the existing version is reused and its tags refreshed);
4. tags the version with its lineage and headline numbers, writes a markdown description,
   points ``candidate`` at it and applies the promotion rule (:mod:`clip_registry.promote`).

Version tags: ``clipops.run_id``, ``clipops.run_name``, ``clipops.model``,
``clipops.model_config`` (JSON), ``clipops.git_commit``, ``clipops.dataset_version``,
``clipops.steps``, ``clipops.samples_seen``, ``clipops.weights_sha256``,
``clipops.metric.<TASK/DATASET/METRIC>``, ``clipops.overlap.<DATASET/FIELD>``,
``clipops.eval_artifacts`` / ``clipops.overlap_artifact`` (``runs:/`` URIs of the linked
files), ``clipops.suite`` / ``clipops.suite_fingerprint`` (the suite the evaluation ran,
:mod:`clip_eval.suite_identity`), and the promotion tags.

A registered model is evaluated on one suite: its first evaluated version declares it (the
same two tags on the registered model), a run evaluated on another suite is refused before
anything is registered, and the nightly evaluation re-runs that suite (``flows.nightly``).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_core.checkpoint import CheckpointError, load_checkpoint
from clip_registry.metrics import headline_metrics, overlap_statuses, overlap_summary
from clip_registry.promote import (
    CANDIDATE,
    MAX_TAG_CHARS,
    METRIC_TAG,
    SECTION,
    Decision,
    PromotionRule,
    apply_rule,
)

CHECKPOINT_ARTIFACT = "checkpoint"
EVAL_ARTIFACT = "eval"
OVERLAP_ARTIFACT = "overlap"
RUN_ID_TAG = "clipops.run_id"
OVERLAP_TAG = "clipops.overlap."
EVAL_FILES = ("results.jsonl", "summary.md")
#: The suite a registered model is evaluated on (registered-model and version tags).
SUITE_TAG = "clipops.suite"
SUITE_FINGERPRINT_TAG = "clipops.suite_fingerprint"


class RegistryError(ValueError):
    """Registration cannot proceed: unknown run, unfinished run, missing checkpoint, bad input."""


@dataclass(frozen=True)
class Registration:
    """What :func:`register_run` did."""

    name: str
    version: str
    aliases: tuple[str, ...]
    decision: Decision
    run_id: str
    model_uri: str  # models:/NAME/VERSION
    created: bool  # False when an existing version of the run was reused


def default_model_name(model: str) -> str:
    """Registered name of a model config: ``ViT-B-32`` -> ``clip-vit-b32``, ``tiny-vit`` ->
    ``clip-tiny-vit``, ``RN50`` -> ``clip-rn50``."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    slug = re.sub(r"(?<![a-z0-9])([a-z])-(?=\d)", r"\1", slug)
    return f"clip-{slug}"


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _get_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"run {run_id!r} not found: {exc.message}") from exc
    if run.info.status != "FINISHED":
        raise RegistryError(f"run {run_id} is {run.info.status}, not FINISHED; nothing to register")
    return run


def _eval_records(eval_dir: Path) -> list[dict[str, Any]]:
    from clip_eval.report import read_jsonl

    results = eval_dir / "results.jsonl"
    if not results.is_file():
        raise RegistryError(f"--eval-dir {eval_dir}: no results.jsonl (run clipops eval --out)")
    try:
        records = read_jsonl(results)
        if not all(isinstance(r, dict) for r in records):
            raise TypeError("a line is not a JSON object")
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"{results}: not a JSONL file of evaluation records ({exc})") from exc
    return records


def _eval_files(
    eval_dir: Path, records: list[dict[str, Any]]
) -> tuple[list[Path], dict[str, float], dict[str, float]]:
    """The files to link, the headline metrics (version tags, promotion) and the run metrics
    (``transfer/<dataset>/<task>/...``, the names the flows log)."""
    from clip_eval.metrics import eval_metrics

    try:
        heads, run_metrics = headline_metrics(records), eval_metrics(records)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise RegistryError(
            f"{eval_dir / 'results.jsonl'}: not evaluation records ({exc})"
        ) from exc
    files = [eval_dir / f for f in EVAL_FILES if (eval_dir / f).is_file()]
    return files + sorted(eval_dir.glob("*.png")), heads, run_metrics


def declared_suite(records: list[dict[str, Any]]) -> tuple[str, str]:
    """The suite name and fingerprint an evaluation ran (:mod:`clip_eval.suite_identity`)."""
    from clip_eval.suite import SuiteError
    from clip_eval.suite_identity import suite_fingerprint, suite_from_records

    try:
        suite = suite_from_records(records)
    except SuiteError as exc:
        raise RegistryError(f"the evaluation does not name its suite's tasks ({exc})") from exc
    return suite.name, suite_fingerprint(suite)


def _check_suite(client: Any, name: str, fingerprint: str, suite_name: str) -> None:
    """A registered model is evaluated on one suite: refuse a run evaluated on another,
    before anything is registered."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return  # a new model: this run declares its suite
        raise
    declared = tags.get(SUITE_FINGERPRINT_TAG)
    if declared and declared != fingerprint:
        raise RegistryError(
            f"model {name!r} is evaluated on suite {tags.get(SUITE_TAG, '?')!r} "
            f"(fingerprint {declared}); this run was evaluated on {suite_name!r} ({fingerprint}). "
            "Evaluate it on the model's suite, or register it under another --name"
        )


def overlap_tags(report: Any) -> dict[str, str]:
    """The ``clipops.overlap.*`` version tags of an overlap report: the publishable
    contamination figures (:func:`overlap_summary`: never an unverified detector's
    candidates) and the detection statuses (:func:`overlap_statuses`)."""
    numbers = overlap_summary(report)
    tags = {OVERLAP_TAG + k: f"{v:.6g}" for k, v in numbers.items()}
    tags.update({OVERLAP_TAG + k: v[:MAX_TAG_CHARS] for k, v in overlap_statuses(report).items()})
    if not numbers and OVERLAP_TAG + "status" not in tags:
        tags[OVERLAP_TAG + "status"] = "no per-dataset contamination found in the report"
    return tags


def _read_overlap(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"--overlap-report {path}: not a readable JSON file ({exc})") from exc


def _progress(client: Any, metadata: Mapping[str, Any], run: Any) -> tuple[str, str]:
    """Training steps and samples seen: the checkpoint's progress, else the run's metrics."""
    progress = metadata.get("progress")
    progress = progress if isinstance(progress, Mapping) else {}
    steps, samples = progress.get("step"), progress.get("samples_seen")
    if steps is None or samples is None:
        history = client.get_metric_history(run.info.run_id, "train/samples_seen")
        if history:
            last = max(history, key=lambda m: m.step)
            steps = last.step if steps is None else steps
            samples = last.value if samples is None else samples
    return (
        "unknown" if steps is None else str(int(steps)),
        "unknown" if samples is None else str(int(samples)),
    )


@dataclass(frozen=True)
class _Lineage:
    tags: dict[str, str]
    metrics: dict[str, float]
    overlap: dict[str, float]
    summary_md: str


def _lineage(
    client: Any,
    run: Any,
    checkpoint: Path,
    evaluation: tuple[Path, list[dict[str, Any]]] | None,
    overlap_report: Path | None,
) -> _Lineage:
    """Read the checkpoint, link eval/overlap files to the run, build the version tags."""
    try:
        loaded = load_checkpoint(checkpoint)
    except (CheckpointError, OSError) as exc:
        raise RegistryError(
            f"run {run.info.run_id}: artifact checkpoint/ is unusable: {exc}"
        ) from exc
    if loaded.tokenizer is None:
        raise RegistryError(f"run {run.info.run_id}: the checkpoint has no tokenizer")
    run_id, run_tags = run.info.run_id, run.data.tags
    steps, samples = _progress(client, loaded.metadata, run)
    config = json.dumps(loaded.model.config.to_dict(), sort_keys=True, separators=(",", ":"))
    tags = {
        RUN_ID_TAG: run_id,
        "clipops.run_name": run_tags.get("clipops.run_name", run.info.run_name or ""),
        "clipops.model": run_tags.get("clipops.model", "unknown"),
        "clipops.model_config": config[:MAX_TAG_CHARS],
        "clipops.git_commit": run_tags.get("mlflow.source.git.commit", "unknown"),
        "clipops.dataset_version": run_tags.get("clipops.dataset_version", "unknown"),
        "clipops.steps": steps,
        "clipops.samples_seen": samples,
        "clipops.weights_sha256": loaded.weights_sha256,
    }
    metrics: dict[str, float] = {}
    summary_md = ""
    if evaluation is not None:
        eval_dir, records = evaluation
        files, metrics, run_metrics = _eval_files(eval_dir, records)
        tags[SUITE_TAG], tags[SUITE_FINGERPRINT_TAG] = declared_suite(records)
        for f in files:
            client.log_artifact(run_id, str(f), EVAL_ARTIFACT)
        step = int(steps) if steps.isdigit() else 0
        for key, value in run_metrics.items():
            if run.data.metrics.get(key) != value:  # a rerun (or the flow's own log) adds none
                client.log_metric(run_id, key, value, step=step)
        tags["clipops.eval_artifacts"] = f"runs:/{run_id}/{EVAL_ARTIFACT}"
        summary = eval_dir / "summary.md"
        summary_md = summary.read_text(encoding="utf-8") if summary.is_file() else ""
    overlap: dict[str, float] = {}
    if overlap_report is not None:
        loaded = _read_overlap(overlap_report)
        overlap = overlap_summary(loaded)
        client.log_artifact(run_id, str(overlap_report), OVERLAP_ARTIFACT)
        tags["clipops.overlap_artifact"] = (
            f"runs:/{run_id}/{OVERLAP_ARTIFACT}/{overlap_report.name}"
        )
        tags.update(overlap_tags(loaded))
    tags.update({METRIC_TAG + k: f"{v:.6g}" for k, v in metrics.items()})
    return _Lineage(tags, metrics, overlap, summary_md)


def _description(name: str, lineage: _Lineage) -> str:
    t = lineage.tags
    lines = [
        f"# {name}: run `{t['clipops.run_name']}`",
        "",
        f"- model `{t['clipops.model']}`, weights sha256 `{t['clipops.weights_sha256'][:16]}...`",
        f"- code `{t['clipops.git_commit']}`, dataset version `{t['clipops.dataset_version']}`",
        f"- {t['clipops.steps']} steps, {t['clipops.samples_seen']} samples seen",
    ]
    if "clipops.eval_artifacts" in t:
        lines.append(
            f"- evaluation: `{t['clipops.eval_artifacts']}` (results.jsonl, summary.md, plots)"
        )
    if "clipops.overlap_artifact" in t:
        lines.append(f"- overlap report: `{t['clipops.overlap_artifact']}`")
    if OVERLAP_TAG + "status" in t:
        lines.append(f"- overlap status: {t[OVERLAP_TAG + 'status']}")
    if lineage.metrics:
        lines += ["", "| metric | value |", "| --- | ---: |"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in lineage.metrics.items()]
    if lineage.overlap:
        lines += ["", "| overlap | value |", "| --- | ---: |"]
        lines += [f"| {k} | {100 * v:.2f}% |" for k, v in lineage.overlap.items()]
    if lineage.summary_md:
        lines += [
            "",
            "<details><summary>evaluation summary</summary>",
            "",
            lineage.summary_md,
            "</details>",
        ]
    return "\n".join(lines) + "\n"


def _existing_version(client: Any, name: str, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    versions = sorted((int(v.version) for v in found), reverse=True)
    return str(versions[0]) if versions else None


def register_run(
    run_id: str,
    *,
    name: str | None = None,
    eval_dir: str | Path | None = None,
    overlap_report: str | Path | None = None,
    tracking_uri: str | None = None,
    rule: PromotionRule | None = None,
) -> Registration:
    """Register run ``run_id``'s checkpoint as a version of ``name`` (see the module doc)."""
    import mlflow

    from clip_registry.logged import log_clip_model
    from clip_train.tracking import (
        prefer_proxied_artifact_downloads,
        resolve_tracking_uri,
        tracking_client,
    )

    uri = resolve_tracking_uri(tracking_uri)
    client = tracking_client(uri)  # an unreachable server fails here, in seconds
    run = _get_run(client, run_id)
    model = run.data.tags.get("clipops.model")
    if name is None and not model:
        raise RegistryError(f"run {run_id} has no clipops.model tag: give --name")
    name = name or default_model_name(str(model))
    eval_path = None if eval_dir is None else Path(eval_dir)
    overlap_path = None if overlap_report is None else Path(overlap_report)
    if overlap_path is not None and not overlap_path.is_file():
        raise RegistryError(f"--overlap-report {overlap_path}: no such file")
    evaluation = None
    if eval_path is not None:
        evaluation = (eval_path, _eval_records(eval_path))
        suite_name, fingerprint = declared_suite(evaluation[1])
        _check_suite(client, name, fingerprint, suite_name)
    prefer_proxied_artifact_downloads()
    with tempfile.TemporaryDirectory(prefix="clipops-register-") as tmp:
        try:
            local = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, tmp)
        except Exception as exc:  # MlflowException or OSError, depending on the store
            raise RegistryError(
                f"run {run_id} has no {CHECKPOINT_ARTIFACT}/ artifact ({exc})"
            ) from exc
        lineage = _lineage(client, run, Path(local), evaluation, overlap_path)
        version = _existing_version(client, name, run_id)
        created = version is None
        if version is None:
            info = log_clip_model(run_id, local, uri)
            with _tracking_uri(uri):
                version = str(mlflow.register_model(info.model_uri, name).version)
    for key, value in lineage.tags.items():
        client.set_model_version_tag(name, version, key, value)
    if SUITE_FINGERPRINT_TAG in lineage.tags:  # the model's suite: declared by its first run
        declared = client.get_registered_model(name).tags
        for key in (SUITE_TAG, SUITE_FINGERPRINT_TAG):
            if key not in declared:
                client.set_registered_model_tag(name, key, lineage.tags[key])
    previous = client.get_model_version(name, version).description or ""
    kept = previous[previous.index(SECTION) :] if SECTION in previous else ""
    description = _description(name, lineage) + ("\n" + kept if kept else "")
    client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, CANDIDATE, version)
    decision = apply_rule(name, version=version, rule=rule, client=client)
    aliases = tuple(sorted(client.get_model_version(name, version).aliases))
    return Registration(
        name, version, aliases, decision, run_id, f"models:/{name}/{version}", created
    )
