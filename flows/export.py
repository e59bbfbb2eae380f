"""Exports the DVC pipeline reads: one small metrics file per concern, and image plots.

    python -m flows.export train --run-name NAME --metrics pipeline/metrics/train.json \
        --plot pipeline/reports/loss.png
    python -m flows.export eval pipeline/eval/results.jsonl --out-dir pipeline/metrics/eval
    python -m flows.export overlap pipeline/overlap/overlap.json \
        --out pipeline/metrics/overlap_contamination.json

``dvc metrics show`` prints one row per file and one column per key, so every file holds a
handful of numbers and the files share their column names: ``train.json`` has
``final_loss`` and ``steps`` (the newest finished MLflow run tagged ``clipops.run_name``);
``eval/<task>_<metric>.json`` maps each dataset evaluated (and ``mean``) to the registry's
headline number for that task (:func:`clip_registry.metrics.headline_metrics`, e.g.
``zero_shot_top1.json``: ``{"synthetic-test": 0.94, "fashion-mnist-test": 0.61, "mean":
0.775}``); ``overlap_contamination.json`` maps each dataset (and ``max``) to its published
contamination fraction (never an unverified detector's candidates). Every name a run logs
to MLflow is in docs/guides/mlflow.md; these files are the headline subset.

Plots are PNG files (the loss curve here, the evaluation's and overlap's own figures), so
``dvc plots show`` renders offline: DVC's HTML for image plots loads no chart library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clip_registry.metrics import headline_metrics, overlap_summary


def loss_rows(tracking_uri: str, run_name: str) -> list[tuple[int, float]]:
    """``(step, train/loss)`` of the newest finished run named ``run_name``."""
    from mlflow.tracking import MlflowClient

    from clip_train.tracking import RUN_NAME_TAG

    client = MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        ids,
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"flows.export: no finished MLflow run named {run_name!r}")
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    return sorted({int(m.step): float(m.value) for m in history}.items())  # a resume's rewrite


def train_metrics(rows: Sequence[tuple[int, float]]) -> dict[str, float]:
    """``final_loss`` and ``steps`` of a loss curve (``{}`` when it is empty)."""
    if not rows:
        return {}
    step, loss = rows[-1]
    return {"final_loss": loss, "steps": float(step)}


def eval_metric_files(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{"<task>_<metric>": {dataset: value}}``: the headline numbers, one file per metric."""
    files: dict[str, dict[str, float]] = {}
    for key, value in headline_metrics(records).items():
        task, rest = key.split("/", 1)
        dataset, metric = rest.rsplit("/", 1)
        files.setdefault(f"{task}_{metric}", {})[dataset] = value
    return files


def overlap_metrics(report: Any) -> dict[str, float]:
    """``{dataset: contamination}`` (and ``max``) of an ``overlap.json``: published figures."""
    suffix = "/contamination"
    return {k[: -len(suffix)]: v for k, v in overlap_summary(report).items() if k.endswith(suffix)}


def plot_loss(rows: Sequence[tuple[int, float]], path: Path) -> Path:
    """The training loss curve as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in rows], [v for _, v in rows], lw=1.2)
    ax.set(xlabel="optimiser step", ylabel="train/loss", title="Contrastive loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write_json(path: Path, data: Mapping[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(data), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flows.export")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("train", help="final loss and steps (JSON) + loss curve (PNG)")
    p.add_argument("--run-name", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--metrics", required=True, help="JSON file to write")
    p.add_argument("--plot", default=None, help="PNG file to write")
    p = sub.add_parser("eval", help="one headline-metrics JSON per task metric")
    p.add_argument("results", help="results.jsonl of clipops eval")
    p.add_argument("--out-dir", required=True)
    p = sub.add_parser("overlap", help="published contamination per dataset (JSON)")
    p.add_argument("report", help="overlap.json of clipops overlap")
    p.add_argument("--out", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    from clip_eval.report import read_jsonl
    from clip_train.tracking import resolve_tracking_uri

    args = _parser().parse_args(argv)
    if args.what == "train":
        rows = loss_rows(resolve_tracking_uri(args.tracking_uri), args.run_name)
        if not rows:
            raise SystemExit(f"flows.export: run {args.run_name!r} logged no train/loss")
        _write_json(Path(args.metrics), train_metrics(rows))
        if args.plot:
            plot_loss(rows, Path(args.plot))
    elif args.what == "eval":
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.json"):  # a smaller suite leaves no file of the last one
            stale.unlink()
        for name, values in eval_metric_files(read_jsonl(args.results)).items():
            _write_json(out / f"{name}.json", values)
    else:
        try:
            report = json.loads(Path(args.report).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"flows.export: {args.report}: not an overlap report ({exc})") from exc
        _write_json(Path(args.out), overlap_metrics(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
