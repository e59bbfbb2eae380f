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
