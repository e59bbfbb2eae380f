"""Checks of everything the ``pretrain`` pipeline needs, made before any work starts.

:func:`preflight` checks, in a few seconds: the system datasets the source and the
evaluation suite read (Debian packages), the output folder (writable, enough free disk),
loopback ports (the local Ray cluster and the ephemeral Prefect server bind them), the
MLflow tracking URI (a SQLite file's folder writable; a server answering its health check;
a database accepting a connection) and ``$PREFECT_API_URL`` when set. It returns every
problem found, each one line naming the fix; the demo stops on the first list that is not
empty, before ingest, so nothing half-written is left behind or registered.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Free disk the demo needs under its output folder (shards, checkpoints, MLflow artifacts).
DEMO_DISK_BYTES = 2 * 1024**3
#: MLflow tracking schemes the preflight does not probe (hosted, own authentication).
UNCHECKED_SCHEMES = frozenset({"databricks", "databricks-uc", "uc", "mssql"})


class PreflightError(RuntimeError):
    """A prerequisite of the pipeline is missing; the message lists each with its fix."""


@dataclass(frozen=True)
class Prerequisites:
    """What one pipeline run needs."""

    source: str | None
    suite: str
    out_dir: str
    tracking_uri: str
    prefect_api_url: str | None = None
    disk_bytes: int = DEMO_DISK_BYTES


def dataset_problems(source: str | None, suite: str) -> list[str]:
    """One line per system dataset that the source or the suite reads and is not installed."""
    from clip_data.corpora import source_requirements
    from clip_data.errors import MissingDatasetError, SourceError
    from clip_eval.datasets import dataset_requirements
    from clip_eval.suite import SuiteError, load_suite

    try:
        checks: list[Callable[[], None]] = list(source_requirements(source)) if source else []
    except SourceError as exc:  # bad options in a built-in corpus name
        return [f"source: {exc}"]
    try:
        parsed = load_suite(suite)
    except SuiteError as exc:
        return [f"evaluation suite: {exc}"]
    for task in parsed.tasks:
        checks += dataset_requirements(task.dataset, task.dataset_options)
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except MissingDatasetError as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(problems))  # a dataset read twice is reported once


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_problems(out_dir: str, disk_bytes: int) -> list[str]:
    """The output folder must be creatable and writable, with ``disk_bytes`` free under it."""
    out = Path(out_dir)
    fix = "choose another folder with --out"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".clipops-preflight-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return [f"output folder {out} is not writable ({reason}); {fix}"]
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if free < disk_bytes:
        return [
            f"only {free / 1024**3:.1f} GiB free under {out}, the run needs "
            f"{disk_bytes / 1024**3:.1f} GiB; free some space or {fix}"
        ]
    return []


def port_problems() -> list[str]:
    """The local Ray cluster and the ephemeral Prefect server listen on loopback ports."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)
    except OSError as exc:
        return [f"cannot listen on a loopback port ({exc.strerror}); Ray and Prefect need one"]
    return []


def _http_problem(url: str, what: str, fix: str) -> str | None:
    from clip_train.tracking import http_unreachable

    reason = http_unreachable(url)
    return None if reason is None else f"{what} at {url} is not reachable ({reason}); {fix}"


def tracking_problems(uri: str) -> list[str]:
    """The MLflow tracking URI must be usable: a SQLite file's folder writable, a server up."""
    fix = "start it, or unset MLFLOW_TRACKING_URI to use ./mlruns.db"
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        problems = output_problems(str(folder), 0)
        return [p.replace("output folder", "MLflow database folder") for p in problems]
    if uri.startswith(("http://", "https://")):
        problem = _http_problem(uri.rstrip("/") + "/health", "MLflow tracking server", fix)
        return [] if problem is None else [problem]
    if uri.startswith(("postgresql", "mysql")):
        return _database_problems(uri, fix)
    if "://" not in uri or uri.startswith("file:"):
        return output_problems(uri.removeprefix("file://"), 0)
    if uri.split("://", 1)[0] in UNCHECKED_SCHEMES:
        return []  # hosted stores with their own authentication: MLflow reports on them
    return [
        f"unknown MLflow tracking URI scheme {uri.split('://', maxsplit=1)[0]}://; "
        "use sqlite:///, http(s)://, postgresql:// or a folder"
    ]


def _database_problems(uri: str, fix: str) -> list[str]:
    from clip_train.tracking import redacted, tracking_unreachable

    reason = tracking_unreachable(uri)
    if reason is None:
        return []
    return [f"MLflow database {redacted(uri)} is not reachable ({reason}); {fix}"]


def prefect_problems(api_url: str | None) -> list[str]:
    """``$PREFECT_API_URL``, when set, must answer its health check."""
    if not api_url:
        return []  # an ephemeral server is started on a free loopback port
    fix = "start the server (prefect server start) or unset PREFECT_API_URL"
    problem = _http_problem(api_url.rstrip("/") + "/health", "Prefect API", fix)
    return [] if problem is None else [problem]


def preflight(needs: Prerequisites) -> list[str]:
    """Every problem with the prerequisites of one run, one line each (empty: all good)."""
    return [
        *output_problems(needs.out_dir, needs.disk_bytes),
        *dataset_problems(needs.source, needs.suite),
        *port_problems(),
        *tracking_problems(needs.tracking_uri),
        *prefect_problems(needs.prefect_api_url),
    ]


def require(needs: Prerequisites) -> None:
    """Raise :class:`PreflightError` naming every problem (``; ``-joined) when there is one."""
    problems = preflight(needs)
    if problems:
        raise PreflightError("; ".join(problems))


def environment_prerequisites(source: str | None, suite: str, out_dir: str) -> Prerequisites:
    """The prerequisites of a run configured by the environment (MLflow and Prefect URIs)."""
    from clip_train.tracking import resolve_tracking_uri

    return Prerequisites(
        source=source,
        suite=suite,
        out_dir=out_dir,
        tracking_uri=resolve_tracking_uri(None),
        prefect_api_url=os.environ.get("PREFECT_API_URL") or None,
    )
