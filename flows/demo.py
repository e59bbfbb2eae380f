"""The main job (``./dev demo`` = ``clipops demo``): the full ``pretrain`` flow on the defaults.

Embedded defaults: the synthetic corpus (2,048 + 512 pairs) ingested and validated, the
``tiny`` recipe on a local 2-worker Ray cluster, the demo suite (synthetic zero-shot, probes,
robustness, Fashion-MNIST zero-shot and linear probe), SQLite MLflow (``$MLFLOW_TRACKING_URI``
or ``./mlruns.db``) and Prefect (``$PREFECT_API_URL``, else an ephemeral local server whose
runs are kept in ``$PREFECT_HOME``). At the end it prints where everything is.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.defaults import DEMO_SOURCE, DEMO_SUITE


def demo_source(train_samples: int, seed: int) -> str:
    """The demo corpus with ``train_samples`` training pairs (test split: a quarter)."""
    if train_samples == 2048 and seed == 0:
        return DEMO_SOURCE
    test = max(train_samples // 4, 8)
    return f"synthetic:train={train_samples},test={test},seed={seed},image_size=64"


def prefect_defaults() -> None:
    """Ephemeral Prefect on a busy 2-core machine needs more than the 20 s start-up default.

    Prefect reads its settings when it is first imported: call this before that.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def where_everything_is(result: dict[str, Any], seconds: float) -> str:
    """The closing text: eval table, model, MLflow and Prefect UI commands."""
    uri = result["tracking_uri"]
    venv_bin = Path(sys.executable).parent  # the environment the demo runs in
    summary = Path(result["eval_summary"]).read_text(encoding="utf-8")
    lines = [
        "",
        summary.rstrip(),
        "",
        f"finished in {seconds / 60:.1f} min; run directory: {result['run_dir']}",
        f"  shards:           {result['shards']}",
        f"  final model:      {result['final_model']}",
        f"  eval results:     {result['eval_results']}",
        f"  MLflow run:       {result['mlflow_run_id']} ({uri})",
    ]
    if result.get("registered"):
        reg = result["registered"]
        lines.append(
            f"  registered model: {reg['name']} version {reg['version']} "
            f"(aliases: {', '.join(reg.get('aliases') or []) or '-'})"
        )
    mlflow_ui = f"{venv_bin}/mlflow ui --backend-store-uri {shlex.quote(uri)} --port 5000"
    api = os.environ.get("PREFECT_API_URL")
    prefect_ui = (
        f"open {api.removesuffix('/api')}"
        if api
        else f"{venv_bin}/prefect server start  # then open http://127.0.0.1:4200"
    )
    lines += [
        "",
        "MLflow UI:  " + mlflow_ui + "  # then open http://127.0.0.1:5000",
        "Prefect UI: " + prefect_ui,
    ]
    return "\n".join(lines)


def run_demo_chain(
    out_dir: str = "runs/demo",
    *,
    epochs: int | None = None,
    train_samples: int = 2048,
    seed: int = 0,
    suite: str = DEMO_SUITE,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pretrain flow on the embedded defaults; returns the flow's result."""
    prefect_defaults()
    from flows.pretrain import pretrain

    overrides = [f"seed={seed}"]
    if epochs is not None:
        overrides.append(f"optim.epochs={epochs}")
    started = time.time()
    result: dict[str, Any] = pretrain(
        recipe="tiny",
        source=demo_source(train_samples, seed),
        suite=suite,
        overrides=overrides,
        out_dir=out_dir,
    )
    log(where_everything_is(result, time.time() - started))
    return result
