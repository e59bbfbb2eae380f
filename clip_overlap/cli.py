"""``clipops overlap`` and ``clipops overlap-detector``: argument sets and command logic.

``clip_cli.main`` registers the sub-parsers with :func:`add_overlap_arguments` /
:func:`add_detector_arguments` and dispatches to :func:`cmd_overlap` / :func:`cmd_detector`.
Bad input (missing shards, suite, checkpoint or detector, bad options) is one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_overlap_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``clipops overlap``."""
    p.add_argument("--train", required=True, help="pretraining shards (ingest output, or s3://)")
    p.add_argument("--suite", required=True, help="suite YAML (its zero_shot tasks) or 'default'")
    p.add_argument("--model", required=True, help="CLIP checkpoint directory (zero-shot)")
    p.add_argument("--out", required=True, help="output directory")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--detector", default=None, help="detector dir (clipops overlap-detector)")
    how.add_argument(
        "--embedding", choices=["clip"], default=None, help="use the CLIP image tower instead"
    )
    p.add_argument("--threshold", type=float, default=None, help="override the threshold")
    p.add_argument("--min-precision", type=float, default=0.95, help="calibration target")
    p.add_argument(
        "--index",
        choices=["auto", "exact", "ivf", "hnsw"],
        default="auto",
        help="search strategy (auto: exact up to --exact-max stored images, else IVF)",
    )
    p.add_argument("--exact-max", type=int, default=250_000)
    p.add_argument("--split", default="train", help="split of the shards to search")
    p.add_argument(
        "--verify",
        choices=["auto", "on", "off"],
        default="auto",
        help="re-score each query's top candidates by aligned comparison "
        "(auto: with --detector only). Unverified, only planted copies in the shards "
        "calibrate the detector: otherwise its candidates are reported as unverified, "
        "not as contamination",
    )
    p.add_argument("--verify-k", type=int, default=5, help="candidates verified per query")
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads")


def add_detector_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``clipops overlap-detector``."""
    p.add_argument("--train", required=True, help="pretraining shards (ingest output, or s3://)")
    p.add_argument("--out", required=True, help="detector output directory")
    p.add_argument("--tiny", action="store_true", help="the tiny CPU config")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting (JSON value), e.g. --set steps=200",
    )


def _threads(n: int | None) -> None:
    if n is None:
        return
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _errors() -> tuple[type[BaseException], ...]:
    from clip_core.checkpoint import CheckpointError
    from clip_data.errors import SourceError
    from clip_eval.suite import SuiteError
    from clip_overlap.detector import DetectorError
    from clip_train.data import DataError

    return (
        CheckpointError,
        SourceError,
        SuiteError,
        DetectorError,
        DataError,
        FileNotFoundError,
        ValueError,
    )


def cmd_overlap(args: argparse.Namespace) -> int:
    """Run the analysis; print one line per dataset; exit 0, or 2 on bad input."""
    from clip_overlap.index import SearchConfig
    from clip_overlap.pipeline import OverlapConfig, run_overlap
    from clip_overlap.verify import VerifyConfig

    _threads(args.threads)
    try:
        config = OverlapConfig(
            split=args.split,
            min_precision=args.min_precision,
            threshold=args.threshold,
            search=SearchConfig(k=max(5, args.verify_k), kind=args.index, exact_max=args.exact_max),
            verify=args.verify,
            verifier=VerifyConfig(k=args.verify_k),
        )
        report = run_overlap(
            args.train,
            args.suite,
            args.model,
            args.out,
            detector=args.detector,
            embedding="clip" if args.detector is None else "detector",
            config=config,
        )
    except _errors() as exc:
        print(f"clipops overlap: error: {exc}", file=sys.stderr)
        return 2
    for label, r in report["datasets"].items():
        print(f"{label}: {_line(r)}")
    print(f"report: {args.out}/overlap.json  table: {args.out}/overlap.md")
    return 0


def _line(r: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    status = str(r.get("status", "-"))
    unverified = ""
    if r.get("unverified_candidates"):
        unverified = f"; {r['unverified_candidates']} unverified candidates, not counted"
    return (
        f"[{status}{unverified}] contamination {pct(r['contamination'])} "
        f"({r['n_overlap']}/{r['n_all']}), All {pct(r['acc_all'])}, Clean {pct(r['acc_clean'])}, "
        f"p (Bonferroni) {r['p_value_bonferroni']}, threshold {r['threshold']:.4f}"
    )


def cmd_detector(args: argparse.Namespace) -> int:
    """Train the dedicated detector; exit 0, or 2 on bad input."""
    from clip_overlap.detector import DetectorTrainConfig, train_detector

    try:
        base = DetectorTrainConfig.tiny() if args.tiny else DetectorTrainConfig()
        values = base.to_dict()
        for item in args.set:
            key, eq, text = item.partition("=")
            if not eq:
                raise ValueError(f"bad --set {item!r}; expected KEY=VALUE")
            try:
                values[key] = json.loads(text)
            except json.JSONDecodeError:
                values[key] = text
        out = train_detector(args.train, args.out, DetectorTrainConfig.from_dict(values))
    except _errors() as exc:
        print(f"clipops overlap-detector: error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((out / "detector.json").read_text(encoding="utf-8"))
    print(
        f"detector: {out}  ({meta['train_images']} images, loss {meta['loss_first']:.3f} -> "
        f"{meta['loss_last']:.3f}, {meta['seconds']} s)"
    )
    return 0
