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

from flows.defaults import DEMO_RECIPE, DEMO_SOURCE, DEMO_SUITE


def demo_source(
    train_samples: int | None, seed: int, *, fashion: bool = True, tuxpaint: bool = True
) -> str:
    """The demo mix with ``train_samples`` synthetic training pairs (``None``: the mix's; held
    out: 512, or a quarter of another size); ``fashion`` / ``tuxpaint`` False leave those out."""
    options = dict(item.split("=", 1) for item in DEMO_SOURCE.split(":", 1)[1].split(","))
    train_samples = int(options["synthetic"]) if train_samples is None else train_samples
    if train_samples != int(options["synthetic"]):
        options["synthetic_test"] = str(max(train_samples // 4, 8))
    options |= {"synthetic": str(train_samples), "seed": str(seed)}
    options["fashion"] = options["fashion"] if fashion else "0"
    options["tuxpaint"] = options["tuxpaint"] if tuxpaint else "0"
    return "demo-mix:" + ",".join(f"{key}={value}" for key, value in options.items())


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


def _available_only(suite: str, out_dir: str, log: Callable[[str], None]) -> tuple[str, bool, bool]:
    """A copy of ``suite`` without the tasks whose system datasets are missing, and whether
    Fashion-MNIST and the Tux Paint stamps are installed (one line says what is left out)."""
    import yaml

    from clip_core.yamlio import load_yaml
    from clip_data.corpora import check_fashion_mnist, check_tuxpaint
    from clip_data.errors import MissingDatasetError
    from clip_eval.datasets import dataset_requirements

    missing: list[str] = []

    def installed(check: Callable[[], None]) -> bool:
        try:
            check()
        except MissingDatasetError as exc:
            missing.append(str(exc))
            return False
        return True

    fashion, tuxpaint = installed(check_fashion_mnist), installed(check_tuxpaint)
    raw = load_yaml(Path(suite).read_text(encoding="utf-8"))
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for task in raw.get("tasks", []):
        checks = dataset_requirements(task["dataset"], task.get("dataset_options") or {})
        (kept if all(installed(check) for check in checks) else dropped).append(task)
    names = sorted({f"{t['dataset']} {t['task']}" for t in dropped})
    log(
        f"demo: running without {', '.join(names) or 'no evaluation row'}"
        f"{'' if fashion and tuxpaint else ' and their training images'}: "
        + "; ".join(dict.fromkeys(missing))
    )
    path = Path(out_dir) / "suite-without-missing-datasets.yaml"
    path.write_text(yaml.safe_dump({**raw, "tasks": kept}, sort_keys=False), encoding="utf-8")
    return str(path), fashion, tuxpaint


def run_demo_chain(
    out_dir: str = "runs/demo",
    *,
    epochs: int | None = None,
    train_samples: int | None = None,
    seed: int = 0,
    suite: str = DEMO_SUITE,
    skip_missing_datasets: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pretrain flow on the embedded defaults; returns the flow's result.

    Every prerequisite is checked first (:mod:`flows.preflight`): a missing one raises
    :class:`flows.preflight.PreflightError` before any work. With ``skip_missing_datasets``
    a missing Fashion-MNIST or Tux Paint package instead leaves its training images and
    evaluation rows out, said in one line before anything runs.
    """
    from flows.preflight import dataset_problems, environment_prerequisites, require

    fashion = tuxpaint = True
    if skip_missing_datasets and dataset_problems(demo_source(train_samples, seed), suite):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        suite, fashion, tuxpaint = _available_only(suite, out_dir, log)
    source = demo_source(train_samples, seed, fashion=fashion, tuxpaint=tuxpaint)
    require(environment_prerequisites(source, suite, out_dir))
    prefect_defaults()
    from flows.pretrain import pretrain

    overrides = [f"seed={seed}"] + ([] if epochs is None else [f"optim.epochs={epochs}"])
    started = time.time()
    result: dict[str, Any] = pretrain(
        recipe=DEMO_RECIPE,
        source=source,
        suite=suite,
        overrides=overrides,
        out_dir=out_dir,
        # Pixel verification of the CLIP tower's candidates: without it every Fashion-MNIST
        # test image looked like a duplicate of some training image to the tiny model
        # (100% "contamination"); verified, 1.8% (BENCHMARKS.md, "The main job").
        overlap_verify="on",
    )
    log(where_everything_is(result, time.time() - started))
    return result
