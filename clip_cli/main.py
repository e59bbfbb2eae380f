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


def _cmd_demo(args: argparse.Namespace) -> int:
    from clip_train.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        model=args.model, epochs=args.epochs, train_samples=args.train_samples, seed=args.seed
    )
    report = run_demo(args.out, cfg)
    print(f"report: {args.out}/report.json  checkpoint: {report['checkpoint']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="clipops", description="Train, evaluate, audit and ship CLIP models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list the named model configs with parameter counts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser("demo", help="the main job: pretrain a tiny CLIP on synthetic data (CPU)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--model", default="tiny-vit", help="model config name (default: tiny-vit)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``clipops`` console script."""
    args = build_parser().parse_args(argv)
    from clip_train.runtime import tune_allocator

    tune_allocator()
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
