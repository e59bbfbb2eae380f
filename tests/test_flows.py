"""Flows: summaries, deployment definitions, and a failed validation stopping the pretrain flow.

The end-to-end run through a Prefect server, a work pool and a worker is in
``tests/test_flows_e2e.py`` (slow).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from clip_train.config import list_recipes, load_run_config
from flows.summaries import (
    comparison_rows,
    curve_summary,
    data_markdown,
    eval_metrics,
    headline_metrics,
    metric_key,
    rows_markdown,
    validation_markdown,
)

ROOT = Path(__file__).resolve().parent.parent


def _record(dataset: str, task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": dataset, "task": task, "metrics": metrics, "timing": {"seconds": 1.0}}


def test_eval_metrics_keeps_finite_scalars_with_stable_names() -> None:
    records = [
        _record("synthetic-test", "zero_shot", {"top1": 0.75, "ensembling": {"bare_top1": 0.5}}),
        _record("digits", "few_shot", {"ks": [1, 2], "mean_top1": [0.1, 0.2], "c": None}),
        _record("tux", "retrieval", {"image_R@1": 0.25, "bad": float("nan"), "flag": True}),
    ]
    assert eval_metrics(records) == {
        "eval/synthetic-test/zero_shot/top1": 0.75,
        "eval/synthetic-test/zero_shot/ensembling/bare_top1": 0.5,
        "eval/tux/retrieval/image_R_1": 0.25,
    }
    assert metric_key("eval", "a:b", "c") == "eval/a_b/c"


def test_headline_and_comparison_rows() -> None:
    records = [
        _record("syn", "zero_shot", {"top1": 0.8}),
        _record("syn", "linear_probe", {"top1": 0.9}),
        _record("syn", "robustness", {"zero_shot": {"id_top1": 0.5}}),
    ]
    heads = headline_metrics(records)
    assert heads == {"syn/zero_shot": 0.8, "syn/linear_probe": 0.9}
    rows = comparison_rows(
        [
            {"name": "m", "version": 1, "aliases": ["champion"], "metrics": heads},
            {"name": "m", "version": 2, "aliases": [], "metrics": {"syn/zero_shot": 0.85}},
        ]
    )
    assert rows[0] == {
        "model": "m",
        "version": "1",
        "aliases": "champion",
        "syn/linear_probe": 90.0,
        "syn/zero_shot": 80.0,
    }
    assert rows[1]["syn/linear_probe"] is None and rows[1]["aliases"] == "-"
    text = rows_markdown(rows, "Nightly")
    assert "| m | 2 | - | - | 85.0 |" in text


def test_data_and_validation_markdown() -> None:
    manifest = {
        "counts": {
            "read": 10,
            "accepted": 7,
            "duplicates": 1,
            "quarantined": 2,
            "per_reason": {"decode": 2},
            "per_split": {"train": 5, "test": 2},
        },
        "shards": [{"bytes": 1000}, {"bytes": 24}],
        "dataset_version": {"dvc_md5": "abc.dir"},
    }
    text = data_markdown(manifest, "/d")
    assert "| 10 | 7 | 1 | 2 |" in text and "`decode`: 2" in text and "abc.dir" in text
    assert "1,024 bytes" in text and "test 2, train 5" in text
    failed = validation_markdown(
        False, "validation FAILED", [{"name": "sha", "column": None, "unexpected_count": 3}]
    )
    assert "FAILED: training was not started" in failed and "| sha | - | 3 |" in failed


def test_curve_summary() -> None:
    s = curve_summary([(10, 2.0), (0, 5.0), (5, 1.5)])
    assert (s["first_step"], s["first_loss"], s["last_step"], s["last_loss"]) == (0, 5.0, 10, 2.0)
    assert (s["min_step"], s["min_loss"]) == (5, 1.5)
    assert curve_summary([]) == {}


def test_train_overrides_resolve_in_a_real_run_config() -> None:
    from flows.pretrain import train_overrides

    sets = train_overrides(
        shards="/data/s",
        run_name="r1",
        storage_path="/st",
        ray_address="ray://head:10001",
        num_workers=4,
        use_gpu=False,
        tracking_uri="sqlite:////tmp/x.db",
        extra=["infra.num_workers=8"],
    )
    cfg = load_run_config("tiny", sets)
    assert cfg.data.shards == "/data/s" and cfg.infra.run_name == "r1"
    assert cfg.infra.storage_path == "/st" and cfg.infra.ray_address == "ray://head:10001"
    assert cfg.infra.num_workers == 8  # the user's overrides win
    assert cfg.tracking.uri == "sqlite:////tmp/x.db" and cfg.infra.use_gpu is False


def _deployments() -> list[dict[str, Any]]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments: list[dict[str, Any]] = spec["deployments"]
    return deployments


def _flow_of(entrypoint: str) -> Any:
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_prefect_yaml_deployments_match_the_flows_and_recipes() -> None:
    names = set()
    for d in _deployments():
        flow = _flow_of(d["entrypoint"])
        names.add(f"{flow.name}/{d['name']}")
        params = inspect.signature(flow.fn).parameters
        unknown = set(d.get("parameters") or {}) - set(params)
        assert not unknown, (d["name"], unknown)
        recipe = (d.get("parameters") or {}).get("recipe")
        if recipe is not None:
            assert recipe in list_recipes()
        assert d["work_pool"]["name"] == "clipops-process"
    assert {
        "pretrain/tiny",
        "pretrain/rn50",
        "pretrain/vit-b32",
        "pretrain/vit-b16",
        "pretrain/vit-l14",
        "nightly-eval/default",
        "ingest/adhoc",
        "evaluate/adhoc",
    } <= names
    nightly = next(d for d in _deployments() if d["entrypoint"].startswith("flows/nightly"))
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key}"
    return found[0]


@pytest.mark.slow
def test_failed_validation_stops_the_flow_before_training(
    tmp_path: Path, prefect_server: None
) -> None:
    from flows import stages
    from flows.pretrain import pretrain

    shards = tmp_path / "shards"
    stages.ingest_source.fn("synthetic:train=40,test=8,seed=1,image_size=32", str(shards), 1)
    shard = sorted(shards.glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the manifest's sha256 no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(stages.ValidationFailedError, match="validation FAILED"):
        pretrain(source=None, shards=str(shards), out_dir=str(tmp_path / "runs"), run_name="r")
    assert not (tmp_path / "runs" / "r" / "train").exists()
    artifact = _artifact("pretrain-validation")
    assert "training was not started" in artifact.data and "FAIL" in artifact.data
