"""MLflow tracking for pretraining runs.

The driver opens (or, for a resumed run, reopens) one MLflow run per training run name and
logs the resolved config as params and the lineage as tags; rank 0 of the training workers
logs per-step metrics into that run. Metric names are stable (documented in
docs/training.md):

    train/loss, train/lr, train/logit_scale, train/pairs_per_s, train/data_wait_fraction,
    train/epoch, train/samples_seen, train/grad_norm (when clipping), train/resume_step
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlruns.db"
RUN_NAME_TAG = "clipops.run_name"

#: One experiment per model family, chosen by table (never by substring).
FAMILY_BY_MODEL = {
    "RN50": "clip-resnet",
    "RN101": "clip-resnet",
    "RN50x4": "clip-resnet",
    "RN50x16": "clip-resnet",
    "RN50x64": "clip-resnet",
    "ViT-B-32": "clip-vit-b",
    "ViT-B-16": "clip-vit-b",
    "ViT-L-14": "clip-vit-l",
    "ViT-L-14-336": "clip-vit-l",
    "tiny-vit": "clip-tiny",
    "tiny-rn": "clip-tiny",
}


def resolve_tracking_uri(uri: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else SQLite in the working directory.

    A bare ``postgresql://`` database URI gets the installed driver (``postgresql+psycopg2``)
    by name, whatever SQLAlchemy's default for the bare scheme (psycopg 3 from 2.1 on).
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not chosen:
        return f"sqlite:///{Path(DEFAULT_DB).resolve()}"
    if chosen.startswith("postgresql://"):
        return "postgresql+psycopg2://" + chosen[len("postgresql://") :]
    return chosen


#: Seconds a reachability check of the tracking server waits for an answer.
CONNECT_TIMEOUT = 5.0
#: MLflow's HTTP retry defaults (7 retries, backoff factor 2) spend ~250 s on a server that
#: is down before saying so; clipops keeps a short retry for a blip (~7 s), unless set.
FAST_HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


class TrackingUnreachableError(RuntimeError):
    """The MLflow tracking server (or database) does not answer: nothing was recorded.

    Not an ``OSError``, so the flows' retry condition does not retry it: a server that is
    down stays down for the seconds a retry waits, and the operator needs the URI now."""


def http_unreachable(url: str) -> str | None:
    """Why ``url`` gives no answer (or a 5xx), or ``None`` when the server answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT) as response:
            response.read(256)
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"answers HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def _database_unreachable(uri: str) -> str | None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(CONNECT_TIMEOUT)})
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return first[0] if first else type(exc).__name__
    finally:
        engine.dispose()


def tracking_unreachable(uri: str) -> str | None:
    """Why the tracking server or database at ``uri`` does not answer, or ``None`` when it
    does (or when ``uri`` is a local file store, which has nothing to reach)."""
    if uri.startswith(("http://", "https://")):
        return http_unreachable(uri.rstrip("/") + "/health")
    if uri.startswith(("postgresql", "mysql")):
        return _database_unreachable(uri)
    return None


def redacted(uri: str) -> str:
    """``uri`` without a password (``scheme://user:***@host``)."""
    head, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    auth, _, host = rest.partition("@")
    user = auth.split(":", 1)[0]
    return f"{head}://{user}:***@{host}"


def require_tracking_server(uri: str) -> None:
    """Raise :class:`TrackingUnreachableError` within ~``CONNECT_TIMEOUT`` s, naming the URI,
    when the tracking server does not answer; also shortens MLflow's own HTTP retries."""
    for key, value in FAST_HTTP_RETRIES.items():
        os.environ.setdefault(key, value)
    reason = tracking_unreachable(uri)
    if reason is not None:
        raise TrackingUnreachableError(
            f"MLflow tracking server {redacted(uri)} is unreachable ({reason}); start it or "
            "point MLFLOW_TRACKING_URI at a running one"
        )


def tracking_client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` for ``uri`` (resolved as :func:`resolve_tracking_uri`), after
    checking that its server answers (:func:`require_tracking_server`)."""
    from mlflow import MlflowClient

    resolved = resolve_tracking_uri(uri)
    require_tracking_server(resolved)
    return MlflowClient(resolved)


def prefer_proxied_artifact_downloads() -> None:
    """Download artifacts through the tracking server unless the environment says otherwise.

    MLflow otherwise fetches proxied artifacts straight from S3 with presigned URLs, and
    ``*.gz`` files it uploaded with ``Content-Encoding: gzip`` then fail their size check (the
    tokenizer's merges file of every clipops checkpoint). Call before loading a model.
    """
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts beside the database (not in the working directory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None  # a tracking server decides (e.g. --artifacts-destination s3://...)
    db = Path(uri[len(prefix) :])
    return (db.parent / "mlartifacts" / experiment).resolve().as_uri()


def experiment_name(model_name: str, configured: str | None) -> str:
    """The configured experiment, or the model family's."""
    return configured or FAMILY_BY_MODEL.get(model_name, f"clip-{model_name.lower()}")


@dataclass(frozen=True)
class TrackingTarget:
    """Where rank 0 logs: a tracking URI and an existing run id."""

    uri: str
    run_id: str


def open_run(
    uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]
) -> TrackingTarget:
    """Create the MLflow run for ``run_name``, or reopen the unfinished one (a resume)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            experiment, artifact_location=default_artifact_location(uri, experiment)
        )
    )
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and attributes.status != 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(
            exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name}
        ).info.run_id
        for key, value in sorted(params.items()):
            client.log_param(run_id, key, value[:6000])
    for key, value in sorted(tags.items()):
        client.set_tag(run_id, key, value)
    return TrackingTarget(uri, run_id)


def finish_run(target: TrackingTarget, status: str, artifacts: dict[str, Path]) -> None:
    """Upload ``artifacts`` (artifact path -> local dir) and close the run with ``status``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(target.uri)
    for artifact_path, local in artifacts.items():
        client.log_artifacts(target.run_id, str(local), artifact_path)
    client.set_terminated(target.run_id, status=status)


def gpu_metrics_status() -> str:
    """Whether MLflow's system metrics will include GPUs: "on: N GPU(s) via NVML (driver D)"
    or "off: <reason>" (no nvidia-ml-py, no NVIDIA driver, no device)."""
    try:
        import pynvml  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return "off: nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"off: NVML cannot start ({exc}): no NVIDIA driver on this node"
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        driver = pynvml.nvmlSystemGetDriverVersion()
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        return "off: NVML sees no GPU"
    driver_text = driver.decode() if isinstance(driver, bytes) else str(driver)
    return f"on: {count} GPU(s) via NVML (driver {driver_text})"


class StepLogger:
    """Rank 0's per-step metric logger (with MLflow system metrics while it is open)."""

    def __init__(self, target: TrackingTarget | None, system_metrics: bool) -> None:
        self.target = target
        self.client: Any = None
        self.monitor: Any = None
        if target is None:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(target.uri)
        if system_metrics:
            # MLflow samples GPUs through NVML when it can; say whether it can, not silently
            self.client.set_tag(target.run_id, "clipops.gpu_metrics", gpu_metrics_status())
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(
                    target.run_id, sampling_interval=5, resume_logging=True, tracking_uri=target.uri
                )
                self.monitor.start()
            except ImportError:  # psutil missing: no system metrics, training goes on
                self.monitor = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log one step's metrics."""
        if self.client is None or self.target is None:
            return
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        self.client.log_batch(self.target.run_id, metrics=batch, synchronous=True)

    def close(self) -> None:
        """Stop system-metrics sampling."""
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
