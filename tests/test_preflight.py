"""flows.preflight and the demo's refusal to start: a missing dataset, an output folder that
cannot be written, an unreachable MLflow or Prefect server each stop ``clipops demo`` in
seconds with the fix in one line, before ingest, leaving nothing registered."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from flows.preflight import (
    Prerequisites,
    dataset_problems,
    output_problems,
    port_problems,
    prefect_problems,
    preflight,
    tracking_problems,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO_SUITE = ROOT / "configs" / "demo-suite.yaml"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _suite_with_fashion_root(tmp_path: Path, root: Path) -> Path:
    text = DEMO_SUITE.read_text(encoding="utf-8").replace(
        "dataset_options: {n_train: 1000, n_test: 1000}",
        f"dataset_options: {{n_train: 1000, n_test: 1000, root: {root}}}",
    )
    assert str(root) in text
    suite = tmp_path / "suite.yaml"
    suite.write_text(text, encoding="utf-8")
    return suite


def _demo(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    clean |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **env}
    clean["PREFECT_HOME"] = str(tmp_path / "prefect")
    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "clipops"), "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean,
        cwd=tmp_path,
        check=False,
    )
    return done, time.monotonic() - started


def _assert_refused(done: subprocess.CompletedProcess[str], seconds: float, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert seconds < 30, seconds
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("clipops demo: cannot start: "), done.stderr[-2000:]
    for needle in needles:
        assert needle in last, last
    assert "Traceback" not in done.stderr and "ingest" not in done.stdout + done.stderr


def test_demo_stops_at_once_on_a_missing_dataset(tmp_path: Path) -> None:
    suite = _suite_with_fashion_root(tmp_path, tmp_path / "no-fashion")
    done, seconds = _demo(tmp_path, "--out", str(tmp_path / "runs"), "--suite", str(suite))
    _assert_refused(
        done, seconds, "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist"
    )
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked, nothing registered
    assert not list((tmp_path / "runs").glob("*/shards"))


def test_demo_stops_at_once_on_an_output_folder_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done, seconds = _demo(tmp_path, "--out", str(blocker / "runs"))
    _assert_refused(done, seconds, f"output folder {blocker / 'runs'} is not writable", "--out")
    assert not (tmp_path / "mlflow.db").exists()


def test_demo_stops_at_once_on_an_unreachable_tracking_server(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    done, seconds = _demo(tmp_path, "--out", str(tmp_path / "runs"), MLFLOW_TRACKING_URI=uri)
    _assert_refused(done, seconds, f"MLflow tracking server at {uri}/health is not reachable")


def test_skip_missing_datasets_says_so_first_and_drops_those_rows(tmp_path: Path) -> None:
    from flows.demo import _available_only

    suite = _suite_with_fashion_root(tmp_path, tmp_path / "no-fashion")
    lines: list[str] = []
    path, fashion, tuxpaint = _available_only(str(suite), str(tmp_path), lines.append)
    assert (fashion, tuxpaint) == (True, True)  # installed; only the suite's root is wrong
    (line,) = lines  # said once, before anything runs
    assert line.startswith("demo: running without fashion-mnist-test linear_probe, ")
    assert (
        "fashion-mnist-test zero_shot" in line and "apt-get install dataset-fashion-mnist" in line
    )
    text = Path(path).read_text(encoding="utf-8")
    assert "fashion-mnist-test" not in text and "synthetic-test" in text and "tuxpaint" in text
    assert dataset_problems(None, path) == []
    assert len(dataset_problems(None, str(suite))) == 1  # zero-shot and probe: one line


def test_each_check_finds_its_problem(tmp_path: Path) -> None:
    assert output_problems(str(tmp_path / "new" / "deeper"), 0) == []
    assert (tmp_path / "new" / "deeper").is_dir()
    (low,) = output_problems(str(tmp_path), 1 << 60)
    assert "GiB free under" in low and "choose another folder with --out" in low
    assert port_problems() == []
    assert tracking_problems(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}") == []
    (tmp_path / "blocker").write_text("a file, not a folder")
    (bad,) = tracking_problems(f"sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}")
    assert "MLflow database folder" in bad and "not writable" in bad
    port = _closed_port()
    (api,) = prefect_problems(f"http://127.0.0.1:{port}/api")
    assert f"Prefect API at http://127.0.0.1:{port}/api/health is not reachable" in api
    assert "unset PREFECT_API_URL" in api
    (scheme,) = tracking_problems("ftp://example.invalid/x")
    assert "unknown MLflow tracking URI scheme" in scheme
    assert tracking_problems("databricks://profile") == []  # hosted: not probed
    (bad_source,) = dataset_problems("demo-mix:fashoin=3", str(DEMO_SUITE))
    assert bad_source.startswith("source: unknown demo-mix option(s) ['fashoin']")
    needs = Prerequisites("demo-mix", str(DEMO_SUITE), str(tmp_path / "out"), "sqlite:///x.db")
    assert preflight(needs) == []


def test_unreachable_database_is_reported_without_its_password(tmp_path: Path) -> None:
    uri = f"postgresql+psycopg2://clip:s3cret@127.0.0.1:{_closed_port()}/mlflow"
    started = time.monotonic()
    (problem,) = tracking_problems(uri)
    assert time.monotonic() - started < 15
    assert "MLflow database" in problem and "not reachable" in problem
    assert "s3cret" not in problem
