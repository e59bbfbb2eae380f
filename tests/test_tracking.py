"""MLflow tracking defaults: the tracking URI and artifact downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clip_train.tracking import prefer_proxied_artifact_downloads, resolve_tracking_uri


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None) == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"  # config beats env
    # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3, which is not installed
    pg = resolve_tracking_uri("postgresql://u@127.0.0.1:5432/mlflow")
    assert pg == "postgresql+psycopg2://u@127.0.0.1:5432/mlflow"
    assert resolve_tracking_uri(pg) == pg


def test_proxied_downloads_default_keeps_an_explicit_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", raising=False)
    prefer_proxied_artifact_downloads()
    assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "true")
    prefer_proxied_artifact_downloads()
    assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "true"


def test_the_run_says_whether_gpu_metrics_are_sampled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On this CPU machine the run's tag says GPU metrics are off and why; with NVML
    answering (a stand-in module) it names the GPU count and driver."""
    import sys
    import types

    from mlflow.tracking import MlflowClient

    from clip_train.tracking import StepLogger, gpu_metrics_status, open_run

    target = open_run(f"sqlite:///{tmp_path / 'm.db'}", "gpu-tag", "run", {}, {})
    StepLogger(target, system_metrics=True).close()
    tag = MlflowClient(target.uri).get_run(target.run_id).data.tags["clipops.gpu_metrics"]
    assert tag.startswith("off: ") and ("NVML" in tag or "nvidia-ml-py" in tag), tag

    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    fake.NVMLError = NVMLError  # type: ignore[attr-defined]
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 8  # type: ignore[attr-defined]
    fake.nvmlSystemGetDriverVersion = lambda: b"580.65"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_metrics_status() == "on: 8 GPU(s) via NVML (driver 580.65)"

    def no_driver() -> None:
        raise NVMLError("Driver Not Loaded")

    fake.nvmlInit = no_driver  # type: ignore[attr-defined]
    assert gpu_metrics_status().startswith("off: NVML cannot start (Driver Not Loaded)")
