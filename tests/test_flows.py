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
    headline_metrics,
    rows_markdown,
    validation_markdown,
)

ROOT = Path(__file__).resolve().parent.parent


def _record(dataset: str, task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": dataset, "task": task, "metrics": metrics, "timing": {"seconds": 1.0}}


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


def test_export_eval_writes_one_small_file_per_task_metric(tmp_path: Path) -> None:
    """``dvc metrics show`` gets a row per task metric and a column per dataset (+ mean)."""
    import json

    from clip_eval.report import write_jsonl
    from flows.export import main

    records = [
        _record("syn", "zero_shot", {"top1": 0.7, "top5": 0.9}),
        _record("syn", "linear_probe", {"top1": 0.8, "C": 0.5, "sweep": {"C_1e6": 0.1}}),
        _record("digits", "zero_shot", {"top1": 0.2}),
        _record("tux", "retrieval", {"image_to_text_R@1": 0.3, "text_to_image_R@1": 0.4}),
    ]
    results = write_jsonl(records, tmp_path / "results.jsonl")
    out = tmp_path / "m"
    (out / "gone_top1.json").parent.mkdir()
    (out / "gone_top1.json").write_text("{}")  # a previous, larger suite's file
    assert main(["eval", str(results), "--out-dir", str(out)]) == 0
    files = {f.name: json.loads(f.read_text()) for f in sorted(out.iterdir())}
    assert files == {
        "linear_probe_top1.json": {"syn": 0.8, "mean": 0.8},
        "retrieval_image_to_text_R1.json": {"tux": 0.3},
        "retrieval_text_to_image_R1.json": {"tux": 0.4},
        "zero_shot_top1.json": {"syn": 0.7, "digits": 0.2, "mean": pytest.approx(0.45)},
    }


def test_export_train_and_overlap_metrics(tmp_path: Path) -> None:
    """The loss curve's last point (a resumed step logged twice counts once) and only the
    published contamination figures, never an unverified detector's candidates."""
    from flows.export import overlap_metrics, plot_loss, train_metrics

    assert train_metrics([(1, 4.9), (2, 4.5), (3, 4.1)]) == {"final_loss": 4.1, "steps": 3.0}
    assert train_metrics([]) == {}
    png = plot_loss([(1, 4.9), (2, 4.5)], tmp_path / "r" / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    report = {
        "datasets": {
            "a": {"contamination": 0.02, "all_minus_clean": 0.001, "status": "calibrated"},
            # written before statuses existed: 17 uncalibrated cosine candidates, no exact copy
            "b": {
                "contamination": 0.017,
                "n_overlap": 17,
                "n_all": 1000,
                "exact_duplicates": 0,
                "score": "cosine",
                "calibration": "simulated",
            },
        }
    }
    shown = overlap_metrics(report)
    assert shown["a"] == 0.02 and shown["max"] == max(shown.values())
    assert shown["b"] == 0.0, shown  # its exact duplicates only, of which there are none


def test_demo_closing_text_names_every_place(tmp_path: Path) -> None:
    from flows.defaults import DEMO_SOURCE
    from flows.demo import demo_source, where_everything_is

    assert demo_source(None, 0) == DEMO_SOURCE == demo_source(6144, 0)
    assert demo_source(256, 3).startswith("demo-mix:synthetic=256,synthetic_test=64,")
    assert demo_source(256, 3).endswith(",seed=3")
    assert "fashion=0" in demo_source(None, 0, fashion=False)
    assert "tuxpaint=0" in demo_source(None, 0, tuxpaint=False)
    summary = tmp_path / "summary.md"
    summary.write_text("| model | dataset |\n")
    text = where_everything_is(
        {
            "tracking_uri": "sqlite:////x/mlruns.db",
            "eval_summary": str(summary),
            "run_dir": "/r",
            "shards": "/r/shards",
            "final_model": "/r/final",
            "eval_results": "/r/eval/results.jsonl",
            "mlflow_run_id": "abc",
            "registered": {"name": "clip-tiny-vit", "version": "3", "aliases": ["candidate"]},
        },
        125.0,
    )
    assert "| model | dataset |" in text and "2.1 min" in text
    assert "clip-tiny-vit version 3 (aliases: candidate)" in text
    assert "mlflow ui --backend-store-uri sqlite:////x/mlruns.db" in text
    assert "prefect server start" in text or "open http" in text


def test_overlap_rows_and_registry_markdown() -> None:
    from flows.summaries import overlap_rows, registry_markdown

    report = {
        "datasets": {
            "syn": {
                "n_all": 300,
                "n_overlap": 6,
                "contamination": 0.02,
                "acc_all": 0.75,
                "acc_clean": 0.74,
                "all_minus_clean": 0.01,
                "p_value_bonferroni": 0.3,
            },
            "empty": {"n_all": 10, "n_overlap": 0, "contamination": 0.0, "acc_overlap": None},
        }
    }
    rows = overlap_rows(report)
    assert [r["dataset"] for r in rows] == ["empty", "syn"]
    assert rows[1]["contamination (%)"] == 2.0 and rows[1]["all - clean (points)"] == 1.0
    assert rows[0]["acc clean (%)"] is None
    text = registry_markdown(
        {
            "name": "clip-tiny-vit",
            "version": "2",
            "model_uri": "models:/clip-tiny-vit/2",
            "aliases": ["candidate"],
            "outcome": "rejected",
            "champion_before": "1",
            "champion_after": "1",
            "reasons": ["zero_shot/mean/top1 0.50 < 0.60"],
        }
    )
    assert "version **2**" in text and "`candidate`" in text and "**rejected**" in text
    assert "- zero_shot/mean/top1 0.50 < 0.60" in text


def test_overlap_verification_is_a_checked_flow_parameter() -> None:
    """``overlap_verify`` offers exactly the overlap CLI's modes; others fail at submission."""
    from prefect.exceptions import ParameterTypeError

    from clip_overlap.pipeline import VERIFY_MODES
    from flows.pretrain import pretrain

    schema = pretrain.parameters.properties["overlap_verify"]
    assert set(schema["enum"]) == set(VERIFY_MODES) and schema["default"] == "auto"
    assert pretrain.validate_parameters({"overlap_verify": "off"})["overlap_verify"] == "off"
    with pytest.raises(ParameterTypeError, match="overlap_verify"):
        pretrain.validate_parameters({"overlap_verify": "sometimes"})
    from clip_overlap.pipeline import OverlapError
    from flows.stages import overlap_analysis

    with pytest.raises(OverlapError, match="verify must be one of"):  # before reading anything
        overlap_analysis.fn("/nonexistent", "/nonexistent.yaml", "/m", "/o", verify="sometimes")
