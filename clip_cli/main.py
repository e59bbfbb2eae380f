"""The ``clipops`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _cmd_models(args: argparse.Namespace) -> int:
    from clip_core.registry import get_model_config, list_models, parameter_count

    rows = []
    for name in list_models():
        cfg = get_model_config(name)
        rows.append(
            {
                "name": name,
                "vision": cfg.vision.type,
                "image_size": cfg.vision.image_size,
                "embed_dim": cfg.embed_dim,
                "parameters": parameter_count(cfg),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<14} {'vision':<7} {'res':>4} {'dim':>5} {'parameters':>13}")
    for r in rows:
        print(
            f"{r['name']:<14} {r['vision']:<7} {r['image_size']:>4} {r['embed_dim']:>5} "
            f"{r['parameters']:>13,}"
        )
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from clip_registry.cli import run_register

    return run_register(args)


def _cmd_promote(args: argparse.Namespace) -> int:
    from clip_registry.cli import run_promote

    return run_promote(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from clip_registry.serving import run_serve

    return run_serve(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import prefect_defaults, run_demo_chain

    prefect_defaults()  # before Prefect is imported
    if (args.epochs is not None and args.epochs < 1) or (args.train_samples or 128) < 128:
        print("clipops demo: --epochs must be >= 1 and --train-samples >= 128", file=sys.stderr)
        return 2
    from flows.preflight import PreflightError

    try:
        run_demo_chain(
            args.out,
            epochs=args.epochs,
            train_samples=args.train_samples,
            seed=args.seed,
            suite=args.suite or _demo_suite(),
            skip_missing_datasets=args.skip_missing_datasets,
        )
    except PreflightError as exc:
        print(f"clipops demo: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def _demo_suite() -> str:
    from flows.defaults import DEMO_SUITE

    return DEMO_SUITE


def _parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--option``; the value is JSON when it parses (``3``, ``true``)."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: object = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _cmd_ingest(args: argparse.Namespace) -> int:
    from clip_data.checks import CheckConfig
    from clip_data.ingest import IngestConfig, IngestFailed, ingest, summarize
    from clip_data.shards import ShardConfig
    from clip_data.sources import SourceError

    try:
        checks = {
            "min_side": args.min_side,
            "max_caption_chars": args.max_caption_chars,
            "reencode": args.reencode,
        }
        cfg = IngestConfig(
            checks=CheckConfig(**{k: v for k, v in checks.items() if v is not None}),
            shards=ShardConfig(target_shard_bytes=args.shard_mb << 20),
            max_bad_fraction=args.max_bad_fraction,
            workers=args.workers,
        )
        manifest = ingest(args.source, args.dest, cfg, args.kind, **dict(args.option))
    except IngestFailed as exc:
        print(f"clipops ingest: failed: {exc.summary}", file=sys.stderr)
        return 1
    except (SourceError, ValueError, FileExistsError) as exc:
        print(f"clipops ingest: error: {exc}", file=sys.stderr)
        return 2
    shards = manifest["shards"]
    size = sum(int(s["bytes"]) for s in shards)
    print(summarize(manifest))
    print(f"shards: {len(shards)} ({size:,} bytes)  dest: {args.dest}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from clip_data.validate import DatasetError, ValidationConfig, validate_dataset

    try:
        cfg = ValidationConfig() if args.config is None else ValidationConfig.from_file(args.config)
    except (OSError, ValueError, TypeError) as exc:
        print(f"clipops validate: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        report = validate_dataset(args.dest, cfg)
    except (DatasetError, OSError) as exc:
        print(f"clipops validate: error: {exc}", file=sys.stderr)
        return 2
    if not report.success:
        print(report.summary(), file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from clip_train.config import RunConfigError, load_run_config
    from clip_train.data import DataError
    from clip_train.run import ClusterError, train
    from clip_train.state import TrainCheckpointError

    try:
        cfg = load_run_config(args.config, args.set)
    except RunConfigError as exc:
        print(f"clipops train: bad config: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        result = train(cfg, resume_from=args.resume_from)
    except (TrainCheckpointError, DataError, ClusterError, RunConfigError) as exc:
        print(f"clipops train: error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "run_dir": result.run_dir,
                "final_model": result.final_model,
                "steps": result.steps,
                "samples_seen": result.samples_seen,
                "mlflow_run_id": result.mlflow_run_id,
                "dataset_version": result.dataset_version,
            },
            indent=2,
        )
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clip_core.checkpoint import CheckpointError
    from clip_eval.datasets import DatasetError
    from clip_eval.report import headline, write_report
    from clip_eval.suite import SuiteError, load_suite, run_suite

    out = Path(args.out)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        suite = load_suite(args.suite)
        records = run_suite(
            args.model,
            suite,
            cache_dir=args.cache_dir or out / "feature_cache",
            tokenizer=args.tokenizer,
            progress=args.progress,
            on_record=lambda r: print(f"{r['dataset']} {r['task']}: {headline(r)}", flush=True),
        )
    except (SuiteError, DatasetError, CheckpointError, FileNotFoundError) as exc:
        print(f"clipops eval: error: {exc}", file=sys.stderr)
        return 2
    written = write_report(records, out)
    print(f"results: {written['results']}  summary: {written['summary']}")
    if written["plots_error"]:
        print(f"clipops eval: no plots: {written['plots_error']}", file=sys.stderr)
    return 0


def _cmd_overlap(args: argparse.Namespace) -> int:
    from clip_overlap import cli

    return cli.cmd_overlap(args) if args.command == "overlap" else cli.cmd_detector(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="clipops", description="Train, evaluate, audit and ship CLIP models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list the named model configs with parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser(
        "demo",
        help="the main job: the full pretrain flow (ingest, validate, Ray Train, eval, registry)",
    )
    p.add_argument("--out", default="runs/demo", help="run directories (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="default: the demo recipe's (3)")
    p.add_argument(
        "--train-samples", type=int, default=None, help="synthetic pairs in the mix (6144)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite", default=None, help="eval suite YAML (default: configs/demo-suite)")
    p.add_argument(
        "--skip-missing-datasets",
        action="store_true",
        help="leave out the real-data rows whose Debian dataset is not installed (said first)",
    )
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("ingest", help="validate a source into Parquet shards and a quarantine")
    p.add_argument("source", help="path, s3:// URI or built-in corpus name (e.g. synthetic)")
    p.add_argument("dest", help="output directory (an earlier ingest output is replaced)")
    p.add_argument("--kind", default=None, help="source kind (default: detected)")
    p.add_argument("--workers", type=int, default=2, help="check processes (default: 2)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05)
    p.add_argument("--shard-mb", type=int, default=64, help="target shard size in MiB")
    p.add_argument("--min-side", type=int, default=None, help="smallest image side, pixels")
    p.add_argument("--max-caption-chars", type=int, default=None)
    p.add_argument(
        "--reencode",
        choices=["jpeg", "png", "webp"],
        default=None,
        help="re-encode accepted images to this format (default: keep the bytes as received)",
    )
    p.add_argument(
        "--option",
        type=_parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="source option (repeatable; JSON values such as 3 or true are parsed)",
    )
    p.set_defaults(handler=_cmd_ingest)

    p = sub.add_parser("train", help="pretrain a CLIP on Parquet shards with Ray Train")
    p.add_argument(
        "--config", required=True, help="recipe name (tiny, vit-b32, ...) or run-config YAML"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set infra.num_workers=8",
    )
    p.add_argument(
        "--resume-from", default=None, help="training checkpoint directory to start from"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("validate", help="check an ingest output with Great Expectations")
    p.add_argument(
        "dest", help="ingest output: a directory or s3:// URI (validation.json is written there)"
    )
    p.add_argument("--config", default=None, help="thresholds file (.yaml/.yml or .json)")
    p.set_defaults(handler=_cmd_validate)

    from clip_registry.cli import add_promote_arguments, add_register_arguments

    p = sub.add_parser("register", help="register a training run as an MLflow model version")
    add_register_arguments(p)
    p.set_defaults(handler=_cmd_register)
    p = sub.add_parser("promote", help="re-apply the promotion rule (moves alias champion)")
    add_promote_arguments(p)
    p.set_defaults(handler=_cmd_promote)

    from clip_registry.serving import add_serve_arguments

    p = sub.add_parser(
        "serve", help="serve a registered model (MLflow's scoring server, size-capped requests)"
    )
    add_serve_arguments(p)
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser("eval", help="run an evaluation suite on a checkpoint")
    p.add_argument(
        "--model", required=True, help="checkpoint directory or OpenAI-format .pt/.safetensors"
    )
    p.add_argument(
        "--suite", default="default", help="suite YAML (default: the bundled default suite)"
    )
    p.add_argument("--out", default="runs/eval", help="output directory (default: runs/eval)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: OUT/feature_cache)")
    p.add_argument("--tokenizer", default=None, help="BPE merges file (OpenAI-format weights)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a bar on a terminal, periodic lines otherwise (default); --no-progress: none",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (1 is fastest for tiny models on a busy machine)",
    )
    p.set_defaults(handler=_cmd_eval)

    from clip_overlap.cli import add_detector_arguments, add_overlap_arguments

    p = sub.add_parser("overlap", help="data-overlap analysis: eval sets vs pretraining shards")
    add_overlap_arguments(p)
    p.set_defaults(handler=_cmd_overlap)
    p = sub.add_parser("overlap-detector", help="train the near-duplicate detector (overlap)")
    add_detector_arguments(p)
    p.set_defaults(handler=_cmd_overlap)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clipops`` console script."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
