"""``clipops register`` and ``clipops promote``: argument handling and output.

Both print a JSON object (name, version, aliases, decision, reasons) and return the exit
code: 0 on success, 2 for bad input (unknown run, missing checkpoint, malformed rule, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_register_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``clipops register``."""
    p.add_argument("--run", required=True, help="MLflow run id of a finished pretraining run")
    p.add_argument(
        "--name",
        default=None,
        help="registered model name (default: from the model config, e.g. clip-vit-b32)",
    )
    p.add_argument("--eval-dir", default=None, help="output of `clipops eval --out DIR` to link")
    p.add_argument("--overlap-report", default=None, help="overlap.json of the overlap analysis")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db",
    )
    _add_rule_argument(p)


def add_promote_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``clipops promote``."""
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument(
        "--version", default=None, help="candidate version (default: the 'candidate' alias)"
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db",
    )
    _add_rule_argument(p)


def _add_rule_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="KEY=VALUE|FILE",
        help="promotion rule setting (primary_metric, min_improvement, max_regression, "
        "guarded_prefixes, promote_first, confidence, resamples, seed) or a YAML/JSON file "
        "of them (repeatable)",
    )


def _decision_json(decision: Any) -> dict[str, Any]:
    c = decision.comparison
    interval = None if c is None else {"delta": c.delta, "low": c.low, "high": c.high}
    return {
        "decision": decision.outcome,
        "champion_before": decision.champion_before,
        "champion": decision.champion_after,
        "reasons": list(decision.reasons),
        "interval": interval,
    }


def run_register(args: argparse.Namespace) -> int:
    """``clipops register``: register the run, set ``candidate``, apply the rule."""
    from clip_registry.promote import PromotionRule, RuleError
    from clip_registry.register import RegistryError, register_run
    from clip_train.tracking import TrackingUnreachableError

    try:
        rule = PromotionRule.from_specs(args.rule)
        reg = register_run(
            args.run,
            name=args.name,
            eval_dir=args.eval_dir,
            overlap_report=args.overlap_report,
            tracking_uri=args.tracking_uri,
            rule=rule,
        )
    except (RegistryError, RuleError, TrackingUnreachableError) as exc:
        print(f"clipops register: error: {exc}", file=sys.stderr)
        return 2
    out = {
        "name": reg.name,
        "version": reg.version,
        "aliases": list(reg.aliases),
        "created": reg.created,
        "model_uri": reg.model_uri,
        **_decision_json(reg.decision),
    }
    print(json.dumps(out, indent=2))
    return 0


def run_promote(args: argparse.Namespace) -> int:
    """``clipops promote``: re-apply the promotion rule (idempotent)."""
    from mlflow.exceptions import MlflowException

    from clip_registry.promote import PromotionRule, RuleError, apply_rule
    from clip_train.tracking import TrackingUnreachableError

    try:
        rule = PromotionRule.from_specs(args.rule)
        decision = apply_rule(
            args.name, version=args.version, rule=rule, tracking_uri=args.tracking_uri
        )
    except (RuleError, LookupError, TrackingUnreachableError) as exc:
        print(f"clipops promote: error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"clipops promote: error: {exc.message}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"name": args.name, "version": decision.candidate, **_decision_json(decision)}, indent=2
        )
    )
    return 0
