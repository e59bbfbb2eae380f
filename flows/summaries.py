"""Pure builders of the run summaries the flows publish (markdown, tables, metric dicts).

Nothing here talks to Prefect, MLflow or the file system: manifests, reports and eval records
in, strings / rows / metric dicts out. The flows turn them into Prefect artifacts and MLflow
metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def headline_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The top-1 accuracy of each zero-shot and linear-probe record, keyed ``dataset/task``."""
    out: dict[str, float] = {}
    for r in records:
        top1 = r["metrics"].get("top1")
        if r["task"] in ("zero_shot", "linear_probe") and isinstance(top1, int | float):
            out[f"{r['dataset']}/{r['task']}"] = float(top1)
    return out


def data_markdown(manifest: Mapping[str, Any], shards: str) -> str:
    """Counts, quarantine reasons, shard totals and the dataset version of an ingest."""
    counts = manifest["counts"]
    reasons = counts.get("per_reason") or {}
    size = sum(int(s["bytes"]) for s in manifest["shards"])
    version = (manifest.get("dataset_version") or {}).get("dvc_md5", "unknown")
    lines = [
        "# Data",
        "",
        f"Shards: `{shards}` ({len(manifest['shards'])} files, {size:,} bytes); "
        f"dataset version (DVC md5) `{version}`.",
        "",
        "| read | accepted | duplicates | quarantined |",
        "| ---: | ---: | ---: | ---: |",
        f"| {counts['read']} | {counts['accepted']} | {counts['duplicates']} "
        f"| {counts['quarantined']} |",
    ]
    if reasons:
        lines += ["", "Quarantine reasons:", ""]
        lines += [f"- `{reason}`: {n}" for reason, n in sorted(reasons.items())]
    splits = counts.get("per_split") or manifest.get("splits")
    if isinstance(splits, Mapping) and splits:
        lines += ["", "Rows per split: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items()))]
    return "\n".join(lines) + "\n"


def validation_markdown(success: bool, summary: str, failures: Sequence[Mapping[str, Any]]) -> str:
    """The Great Expectations outcome; on failure, a table of the failing checks."""
    head = "# Validation passed" if success else "# Validation FAILED: training was not started"
    lines = [head, "", "```", summary, "```"]
    if failures:
        lines += ["", "| check | column | unexpected | examples |", "| --- | --- | ---: | --- |"]
        for f in failures:
            examples = ", ".join(repr(x)[:40] for x in (f.get("examples") or [])[:3])
            lines.append(
                f"| {f['name']} | {f.get('column') or '-'} | "
                f"{f.get('unexpected_count') if f.get('unexpected_count') is not None else '-'} "
                f"| {examples.replace('|', '/')} |"
            )
    return "\n".join(lines) + "\n"


def curve_summary(losses: Sequence[tuple[int, float]]) -> dict[str, float]:
    """First, minimum and last loss of a ``(step, loss)`` curve, with their steps."""
    if not losses:
        return {}
    ordered = sorted(losses)
    step_min, loss_min = min(ordered, key=lambda p: p[1])
    return {
        "first_step": float(ordered[0][0]),
        "first_loss": ordered[0][1],
        "min_step": float(step_min),
        "min_loss": loss_min,
        "last_step": float(ordered[-1][0]),
        "last_loss": ordered[-1][1],
    }


def training_markdown(info: Mapping[str, Any], losses: Sequence[tuple[int, float]]) -> str:
    """Run name, steps, samples, final model, MLflow run and the loss curve summary."""
    lines = [
        "# Training",
        "",
        "| run | steps | samples seen | MLflow run | final model |",
        "| --- | ---: | ---: | --- | --- |",
        f"| {info['run_name']} | {info['steps']} | {info['samples_seen']} | "
        f"`{info['mlflow_run_id']}` | `{info['final_model']}` |",
    ]
    s = curve_summary(losses)
    if s:
        lines += [
            "",
            f"Loss (train/loss, {len(losses)} logged steps): {s['first_loss']:.3f} at step "
            f"{s['first_step']:.0f} -> {s['last_loss']:.3f} at step {s['last_step']:.0f} "
            f"(min {s['min_loss']:.3f} at step {s['min_step']:.0f}).",
        ]
    return "\n".join(lines) + "\n"


def eval_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per record: dataset, task, headline result, chance level, seconds."""
    from clip_eval.report import chance_text, headline

    return [
        {
            "dataset": r["dataset"],
            "task": r["task"],
            "result (%)": headline(dict(r)),
            "chance (%)": chance_text(dict(r)),
            "seconds": round(float(r["timing"]["seconds"]), 1),
        }
        for r in records
    ]


def comparison_rows(
    evaluated: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per evaluated model version: name, version, aliases and headline metrics.

    ``evaluated`` items carry ``name``, ``version``, ``aliases`` and ``metrics`` (a
    :func:`headline_metrics` dict). Missing metrics show as ``None``.
    """
    columns = (
        list(keys) if keys is not None else sorted({k for e in evaluated for k in e["metrics"]})
    )
    rows = []
    for e in evaluated:
        row: dict[str, Any] = {
            "model": e["name"],
            "version": str(e["version"]),
            "aliases": ", ".join(e.get("aliases") or []) or "-",
        }
        for k in columns:
            value = e["metrics"].get(k)
            row[k] = None if value is None else round(100 * float(value), 1)
        rows.append(row)
    return rows


def rows_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """A markdown table of dict rows (columns from the first row)."""
    if not rows:
        return f"# {title}\n\n(nothing)\n"
    cols = list(rows[0])
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = ["-" if r.get(c) is None else str(r.get(c)).replace("|", "/") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def overlap_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluation dataset of an overlap report (percentages, p-values).

    ``contamination (%)`` counts only trustworthy overlaps (:func:`clip_overlap.status.
    published`); ``status`` says which detection backs it and ``unverified candidates`` are
    the near-duplicate candidates of an uncalibrated, unverified detector, never counted.
    """
    from clip_overlap.status import published

    def pct(value: Any) -> float | None:
        return None if value is None else round(100 * float(value), 2)

    rows = []
    for label, r in sorted((report.get("datasets") or {}).items()):
        shown = published(r)
        rows.append(
            {
                "dataset": label,
                "status": shown.status,
                "examples": r.get("n_all"),
                "overlap": shown.n_overlap,
                "contamination (%)": pct(shown.contamination),
                "unverified candidates (not counted)": shown.unverified_candidates,
                "acc all (%)": pct(r.get("acc_all")),
                "acc clean (%)": pct(r.get("acc_clean")) if shown.split_stats else None,
                "all - clean (points)": pct(shown.all_minus_clean),
                "p (Bonferroni)": r.get("p_value_bonferroni") if shown.split_stats else None,
            }
        )
    return rows


def registry_markdown(reg: Mapping[str, Any]) -> str:
    """The registered version, its aliases and the promotion decision with its reasons."""
    aliases = ", ".join(f"`{a}`" for a in reg["aliases"]) or "none"
    lines = [
        "# Registered model",
        "",
        f"`{reg['name']}` version **{reg['version']}** (`{reg['model_uri']}`), aliases: {aliases}.",
        "",
        f"Promotion: **{reg['outcome']}** (champion before: "
        f"{reg['champion_before'] or 'none'}, after: {reg['champion_after'] or 'none'}).",
        "",
        *[f"- {r}" for r in reg["reasons"]],
    ]
    return "\n".join(lines) + "\n"
