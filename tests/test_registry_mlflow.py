"""Registration and promotion against a real MLflow SQLite store (no server, no Ray).

Three training runs laid out like clip_train's are registered in turn: the first becomes
champion, a better one is promoted, one that regresses on a dataset is rejected; re-running
registration and promotion changes nothing. The logged model has no pickle (loading it in a
fresh process is covered by tests/test_serving.py: the scoring server is one).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_registry_support import log_training_run, random_checkpoint, write_eval_dir

from clip_cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_single_thread")]
NAME = "clip-tiny-vit"
ZS, LP = "zero_shot", "linear_probe"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A SQLite tracking store with three finished runs and their evaluation outputs."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs, evals = {}, {}
    scores = {
        "a": {("synth", ZS): 0.40, ("digits", ZS): 0.30, ("synth", LP): 0.70},
        "b": {("synth", ZS): 0.60, ("digits", ZS): 0.32, ("synth", LP): 0.71},  # better
        "c": {("synth", ZS): 0.90, ("digits", ZS): 0.20, ("synth", LP): 0.72},  # digits drop
    }
    for i, (key, top1) in enumerate(scores.items()):
        ckpt = random_checkpoint(root / f"ckpt-{key}", seed=i, progress=key != "c")
        runs[key] = log_training_run(uri, ckpt, f"run-{key}", dataset_version=f"md5-{key}")
        evals[key] = write_eval_dir(root / f"eval-{key}", top1)
    overlap = root / "overlap.json"
    overlap.write_text(
        json.dumps({"datasets": {"synth": {"contamination": 0.05, "all_minus_clean": 0.004}}})
    )
    yield {"uri": uri, "runs": runs, "evals": evals, "overlap": overlap, "root": root}


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def test_register_first_run_becomes_champion(store: dict[str, Any]) -> None:
    from clip_registry.register import register_run

    uri, run_a = store["uri"], store["runs"]["a"]
    reg = register_run(
        run_a, eval_dir=store["evals"]["a"], overlap_report=store["overlap"], tracking_uri=uri
    )
    assert (reg.name, reg.version, reg.created) == (NAME, "1", True)
    assert reg.aliases == ("candidate", "champion")
    assert reg.decision.outcome == "promoted"

    client = _client(uri)
    mv = client.get_model_version(NAME, "1")
    tags = mv.tags
    assert mv.run_id == run_a
    assert tags["clipops.git_commit"] == "0123456789abcdef"
    assert tags["clipops.dataset_version"] == "md5-a"
    assert (tags["clipops.steps"], tags["clipops.samples_seen"]) == ("12", "768")
    assert json.loads(tags["clipops.model_config"])["vision"]["image_size"] == 32
    assert float(tags["clipops.metric.zero_shot/synth/top1"]) == pytest.approx(0.40)
    assert float(tags["clipops.metric.zero_shot/mean/top1"]) == pytest.approx(0.35)
    assert float(tags["clipops.metric.linear_probe/synth/top1"]) == pytest.approx(0.70)
    assert float(tags["clipops.overlap.synth/contamination"]) == pytest.approx(0.05)
    assert tags["clipops.promotion.decision"] == "promoted"
    assert "no champion yet" in tags["clipops.promotion.reasons"]
    assert (
        "## Promotion decision" in mv.description and "| zero_shot/synth/top1 |" in mv.description
    )

    # the run compares in the MLflow UI: family experiment, run name, flat params, step metrics
    run = client.get_run(run_a)
    assert client.get_experiment(run.info.experiment_id).name == "clip-tiny"
    assert run.info.run_name == "run-a" == tags["clipops.run_name"]
    assert run.data.params["model.name"] == "tiny-vit" and "optim.lr" in run.data.params
    assert [m.step for m in client.get_metric_history(run_a, "train/loss")] == [1, 2, 3]

    # evaluation files and the overlap report are linked to the run, the feature cache is not
    linked = {f.path for f in client.list_artifacts(run_a, "eval")}
    assert {"eval/results.jsonl", "eval/summary.md"} <= linked
    assert not any("feature_cache" in p for p in linked)
    assert [f.path for f in client.list_artifacts(run_a, "overlap")] == ["overlap/overlap.json"]
    assert tags["clipops.eval_artifacts"] == f"runs:/{run_a}/eval"
    history = client.get_metric_history(run_a, "transfer/synth/zero_shot/top1")
    assert [(m.value, m.step) for m in history] == [(pytest.approx(0.40), 12)]
    assert {k.split("/")[0] for k in run.data.metrics} <= {"train", "transfer"}  # one name each

    # rerunning registration reuses the version and keeps the promotion record
    again = register_run(run_a, eval_dir=store["evals"]["a"], tracking_uri=uri)
    assert (again.version, again.created, again.decision.outcome) == (
        "1",
        False,
        "already_champion",
    )
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["clipops.promotion.decision"] == "promoted"
    assert mv.description.count("## Promotion decision") == 1
    assert len(client.get_metric_history(run_a, "transfer/synth/zero_shot/top1")) == 1


def test_logged_model_has_no_pickle_and_takes_raw_bytes(store: dict[str, Any]) -> None:
    import mlflow
    import pandas as pd  # type: ignore[import-untyped]

    from clip_registry.logged import example_png

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store["uri"])  # models:/ URIs resolve through the global store
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "model_code.py", "artifacts/checkpoint/model.safetensors"} <= files
    assert {"artifacts/checkpoint/clip.json", "artifacts/checkpoint/bpe_merges.txt.gz"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel

    # in-process callers may pass the encoded image as raw bytes instead of base64
    png = example_png()
    frame = pd.DataFrame({"image": [png, base64.b64encode(png).decode()]})
    out = model.predict(frame, params={"task": "embed"})
    raw, b64 = out["image_embedding"]
    assert len(raw) == 128 and raw == pytest.approx(b64)


def test_better_run_promoted_regressing_run_rejected(
    store: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    uri, runs, evals = store["uri"], store["runs"], store["evals"]
    args = ["--tracking-uri", uri, "--rule", "max_regression=0.05"]
    assert main(["register", "--run", runs["b"], "--eval-dir", str(evals["b"]), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["version"], out["decision"], out["champion"]) == ("2", "promoted", "2")
    assert out["aliases"] == ["candidate", "champion"]

    assert main(["register", "--run", runs["c"], "--eval-dir", str(evals["c"]), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["version"], out["decision"], out["champion"]) == ("3", "rejected", "2")
    assert out["aliases"] == ["candidate"]
    assert any(r.startswith("zero_shot/digits/top1 regressed") for r in out["reasons"])

    client = _client(uri)
    before = client.get_model_version(NAME, "3")
    assert before.tags["clipops.promotion.decision"] == "rejected"
    assert "regressed" in before.tags["clipops.promotion.reasons"]
    assert before.tags["clipops.promotion.compared_to"] == "2"
    # run c's checkpoint has no progress metadata: steps and samples come from its metrics
    assert (before.tags["clipops.steps"], before.tags["clipops.samples_seen"]) == ("3", "192")

    # promote again with the same rule: same answer, nothing moves (idempotent)
    assert main(["promote", "--name", NAME, *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["version"], out["decision"], out["champion"]) == ("3", "rejected", "2")
    after = client.get_model_version(NAME, "3")
    assert after.tags == before.tags and after.description == before.description

    # a looser rule promotes it; rerunning reports it as champion and moves nothing
    loose = ["--tracking-uri", uri, "--rule", "max_regression=0.2"]
    assert main(["promote", "--name", NAME, *loose]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "promoted"
    assert main(["promote", "--name", NAME, *loose]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "already_champion"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"


def test_apply_rule_with_fresh_records(store: dict[str, Any]) -> None:
    """What the nightly evaluation does: fresh per-example results for both, paired."""
    from test_registry_support import _record

    from clip_registry.promote import REGRESSION_TAG, PromotionRule, apply_rule

    uri = store["uri"]
    client = _client(uri)
    client.set_registered_model_alias(NAME, "champion", "3")

    def records(synth: float, digits: float) -> list[dict[str, Any]]:
        return [_record("synth", ZS, synth), _record("digits", ZS, digits)]

    same = {"1": records(0.5, 0.3), "3": records(0.5, 0.3)}  # e.g. the same checkpoint twice
    decision = apply_rule(NAME, version=1, records=same, tracking_uri=uri)
    assert (decision.outcome, decision.champion_after) == ("rejected", "3")
    assert decision.comparison is not None and decision.comparison.delta == 0.0
    tags = client.get_model_version(NAME, "1").tags
    assert tags[REGRESSION_TAG] == "false" and tags["clipops.promotion.ci_low"] == "0"

    worse = {"1": records(0.40, 0.25), "3": records(0.5, 0.3)}
    decision = apply_rule(NAME, version=1, records=worse, tracking_uri=uri)
    assert (decision.outcome, decision.champion_after) == ("regressed", "3")
    tags = client.get_model_version(NAME, "1").tags
    assert tags[REGRESSION_TAG] == "true" and float(tags["clipops.promotion.ci_high"]) < 0

    better = {"1": records(0.6, 0.35), "3": records(0.5, 0.3)}
    decision = apply_rule(NAME, version=1, records=better, tracking_uri=uri, rule=PromotionRule())
    assert (decision.outcome, decision.champion_before, decision.champion_after) == (
        "promoted",
        "3",
        "1",
    )
    assert decision.comparison is not None and decision.comparison.low > 0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    tags = client.get_model_version(NAME, "1").tags
    assert float(tags["clipops.promotion.delta"]) == pytest.approx(0.075)
    assert "95% CI" in tags["clipops.promotion.reasons"]
    with pytest.raises(LookupError, match="no 'candidate' alias"):
        apply_rule("no-such-model", tracking_uri=uri)
    with pytest.raises(LookupError, match="has no version 99"):
        apply_rule(NAME, version="99", tracking_uri=uri)


def test_a_run_on_another_suite_is_refused_before_registration(store: dict[str, Any]) -> None:
    from test_registry_support import write_eval_dir

    from clip_registry.register import RegistryError, register_run

    uri, root = store["uri"], store["root"]
    client = _client(uri)
    before = len(client.search_model_versions(f"name = '{NAME}'"))
    declared = client.get_registered_model(NAME).tags["clipops.suite_fingerprint"]
    other = write_eval_dir(root / "eval-other", {("cifar", ZS): 0.9})
    ckpt = random_checkpoint(root / "ckpt-other", seed=7)
    run = log_training_run(uri, ckpt, "run-other")
    with pytest.raises(
        RegistryError, match=f"is evaluated on suite 'test' \\(fingerprint {declared}"
    ):
        register_run(run, eval_dir=other, tracking_uri=uri)
    assert len(client.search_model_versions(f"name = '{NAME}'")) == before


def test_an_unreachable_tracking_server_fails_fast_naming_it() -> None:
    import time

    from prod_stack import free_port

    from clip_registry.promote import apply_rule
    from clip_train.tracking import TrackingUnreachableError

    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnreachableError, match=f"MLflow tracking server {dead} is"):
        apply_rule(NAME, tracking_uri=dead)
    assert time.monotonic() - started < 15
    assert main(["promote", "--name", NAME, "--tracking-uri", dead]) == 2


def test_cli_errors(store: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    uri = store["uri"]
    assert main(["register", "--run", "0" * 32, "--tracking-uri", uri]) == 2
    assert "not found" in capsys.readouterr().err
    run_a = store["runs"]["a"]
    assert main(["register", "--run", run_a, "--tracking-uri", uri, "--rule", "x=1"]) == 2
    assert "unknown promotion rule keys" in capsys.readouterr().err
    missing = str(store["root"] / "none.json")
    assert (
        main(["register", "--run", run_a, "--tracking-uri", uri, "--overlap-report", missing]) == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert main(["register", "--run", run_a, "--tracking-uri", uri, "--eval-dir", missing]) == 2
    assert "no results.jsonl" in capsys.readouterr().err
    assert main(["promote", "--name", "nobody", "--tracking-uri", uri]) == 2
    assert "no 'candidate' alias" in capsys.readouterr().err


def test_unfinished_run_is_refused(
    store: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    uri = store["uri"]
    ckpt = random_checkpoint(store["root"] / "ckpt-failed", seed=9)
    run = log_training_run(uri, ckpt, "run-failed", status="FAILED")
    assert main(["register", "--run", run, "--tracking-uri", uri]) == 2
    assert "is FAILED, not FINISHED" in capsys.readouterr().err
