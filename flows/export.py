"""Exports the DVC pipeline reads: the training loss curve and the eval metrics.

    python -m flows.export loss --run-name NAME --out pipeline/reports/loss.csv
    python -m flows.export eval pipeline/eval/results.jsonl --out pipeline/reports/eval.json \
        --plot pipeline/reports/zeroshot_vs_probe.csv

``loss`` reads ``train/loss`` of the newest finished MLflow run tagged with the run name
(``clipops.run_name``) and writes ``step,loss``. ``eval`` writes the flat
``eval/<dataset>/<task>/<metric>`` dict (DVC metrics) and one ``dataset,zero_shot,
linear_probe`` row per dataset evaluated both ways (DVC's zero-shot vs probe plot).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from clip_eval.metrics import eval_metrics
from flows.summaries import headline_metrics


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
    return sorted((int(m.step), float(m.value)) for m in history)


def zeroshot_vs_probe(records: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """Rows ``dataset, zero_shot, linear_probe`` for datasets evaluated both ways."""
    heads = headline_metrics(records)
    datasets = sorted({key.split("/")[0] for key in heads})
    return [
        {
            "dataset": d,
            "zero_shot": heads[f"{d}/zero_shot"],
            "linear_probe": heads[f"{d}/linear_probe"],
        }
        for d in datasets
        if f"{d}/zero_shot" in heads and f"{d}/linear_probe" in heads
    ]


def _write_csv(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    from clip_eval.report import read_jsonl
    from clip_train.tracking import resolve_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m flows.export")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("loss", help="training loss curve CSV from MLflow")
    p.add_argument("--run-name", required=True)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", required=True)
    p = sub.add_parser("eval", help="DVC metrics JSON (+ zero-shot vs probe CSV)")
    p.add_argument("results", help="results.jsonl of clipops eval")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    if args.what == "loss":
        rows = loss_rows(resolve_tracking_uri(args.tracking_uri), args.run_name)
        _write_csv(Path(args.out), ["step", "loss"], rows)
        return 0
    records = read_jsonl(args.results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(eval_metrics(records), indent=2, sort_keys=True) + "\n")
    if args.plot:
        rows_zp = zeroshot_vs_probe(records)
        _write_csv(
            Path(args.plot),
            ["dataset", "zero_shot", "linear_probe"],
            [[r["dataset"], r["zero_shot"], r["linear_probe"]] for r in rows_zp],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
