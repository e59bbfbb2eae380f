"""Services of the production-like stack for tests: PostgreSQL, MLflow and Prefect servers.

* :func:`postgres` runs Debian's PostgreSQL 15 (``initdb`` + ``pg_ctl``) in a fresh data
  directory on a free loopback port, with password (SCRAM) authentication and its unix socket
  in the same private directory. PostgreSQL refuses to run as root: when the tests run as
  root the server binaries run as the unprivileged ``nobody`` user (``subprocess`` ``user=``),
  in a directory under ``/tmp`` owned by that user.
* :func:`mlflow_server` runs ``mlflow server`` with a database backend store and an
  ``s3://`` artifact destination (proxied artifacts), its output in a log file. The backend
  store URI (it holds the database password) is passed in the environment
  (``MLFLOW_BACKEND_STORE_URI``), not on the command line where ``ps`` would show it.

* :func:`prefect_server` runs ``prefect server start`` with a database (PostgreSQL) backend,
  the connection URL in its environment too.

All are context managers that stop what they started (``pg_ctl stop``; the server's whole
process group) on exit.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_train.run import LOCAL_CLUSTER_ENV

PG_BIN = Path(os.environ.get("CLIPOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "clipops"
# Ray features that cost CPU-seconds per cluster or training run and that no test exercises
# (clip_train.run.LOCAL_CLUSTER_ENV, which a local cluster gets by default): for the
# environment of drivers and of the clusters they start or join (`ray start` clusters too).
RAY_LEAN_ENV = dict(LOCAL_CLUSTER_ENV)


#: How clipops starts a Prefect server: its settings file (infra/prefect/server.env) applied.
PREFECT_SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prefect-server.sh"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for(check: Any, what: str, timeout: float, proc: subprocess.Popen[Any] | None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.5)


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server."""

    host: str
    port: int
    user: str
    password: str
    base: Path  # private directory: data/, the socket, server.log
    log: Path

    def url(self, database: str, driver: str = "postgresql") -> str:
        """SQLAlchemy URL of ``database`` (``driver`` e.g. ``postgresql+asyncpg``)."""
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE name`` (psycopg2 over TCP, password authentication)."""
        import psycopg2  # type: ignore[import-untyped]

        conn = psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()


def _run_as() -> dict[str, Any]:
    """``subprocess`` arguments that drop root for the PostgreSQL binaries (none otherwise)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@contextmanager
def postgres(password: str, timeout: float = 60.0) -> Iterator[Postgres]:
    """A fresh PostgreSQL 15 server on 127.0.0.1 with superuser ``clipops``/``password``."""
    as_user = _run_as()
    base = Path(tempfile.mkdtemp(prefix="/tmp/pg-"))  # short: the socket path has a limit
    if as_user:
        os.chown(base, as_user["user"], as_user["group"])
    data, log, pwfile = base / "data", base / "server.log", base / "pwfile"
    pwfile.write_text(password + "\n", encoding="utf-8")
    if as_user:
        os.chown(pwfile, as_user["user"], as_user["group"])
    pwfile.chmod(0o600)
    run = {"capture_output": True, "text": True, "timeout": timeout, **as_user}
    init = [str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}"]
    init += ["--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]
    try:
        done = subprocess.run(init, check=False, **run)
    finally:
        pwfile.unlink()  # the password must not stay on disk
    if done.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")
    port = free_port()
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    start = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o", opts, "start"]
    try:
        started = subprocess.run(start, check=False, **run)
        if started.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr[-1000:]}\n{text[-2000:]}")
        yield Postgres("127.0.0.1", port, PG_USER, password, base, log)
    finally:
        stop = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
        subprocess.run(stop, check=False, **run)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts_destination: str,
    env: Mapping[str, str],
    log: Path,
    timeout: float = 300.0,
) -> Iterator[str]:
    """``mlflow server`` on a free loopback port; yields its ``http://`` URL.

    ``env`` is the server's whole environment (e.g. the S3 credentials and
    ``MLFLOW_S3_ENDPOINT_URL``); stdout and stderr go to ``log``. The job-execution runner
    (MLflow's background jobs, unused here) is disabled.
    """
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow, "server", "--artifacts-destination", artifacts_destination]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # no job-execution runner (huey consumers: more processes importing mlflow at start-up)
    full_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    full_env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri
    url = f"http://127.0.0.1:{port}"
    with _served(cmd, full_env, log, health=f"{url}/health", what="mlflow server", timeout=timeout):
        yield url


@contextmanager
def _served(
    cmd: list[str], env: Mapping[str, str], log: Path, *, health: str, what: str, timeout: float
) -> Iterator[None]:
    """Run ``cmd`` in its own process group, output to ``log``, until ``health`` answers 200.

    Fails with the log's tail when the server exits or does not become healthy in time;
    stops the whole process group on exit.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            _wait_for(lambda: _healthy(health), what, timeout, proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}; its log ends with:\n{tail}") from None
        yield
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftover children of the group
    proc.wait(timeout=grace)


def processes_mentioning(needles: tuple[str, ...]) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose command line contains one of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        line = raw.replace(b"\0", b" ").decode(errors="replace")
        if any(n in line for n in needles):
            found.append((int(entry.name), line.strip()))
    return found


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Files under ``root`` whose bytes contain ``needle`` (unreadable files are skipped)."""
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:
            continue
    return hits


@contextmanager
def ray_head(env: Mapping[str, str], temp: Path, num_cpus: int = 4) -> Iterator[str]:
    """``ray start --head --block`` in its own process group; yields the GCS address.

    ``env`` is the cluster's environment (its S3 credentials, its token), as on cluster nodes.
    Fixed agent ports: with dynamic ones the raylet waits for the agent to write its port to
    a file and aborts when that takes > 30 s on a loaded machine (seen in the cluster tests).
    """
    port, grpc, listen, runtime_env = (free_port() for _ in range(4))
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}"]
    cmd += [f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"]
    cmd += [f"--dashboard-agent-grpc-port={grpc}", f"--dashboard-agent-listen-port={listen}"]
    cmd += [f"--runtime-env-agent-port={runtime_env}"]
    log = temp.parent / f"{temp.name}-start.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    try:
        _wait_for(listening, "ray start --head", 180.0, proc)
        yield f"127.0.0.1:{port}"
    finally:
        stop_group(proc, grace=30.0)


@contextmanager
def prefect_server(
    database_url: str, env: Mapping[str, str], home: Path, log: Path, timeout: float = 300.0
) -> Iterator[str]:
    """``scripts/prefect-server.sh`` on a free loopback port with ``database_url`` as its
    database.

    Yields the API URL (``http://127.0.0.1:PORT/api``). The database URL (it holds the
    password) travels in the server's environment, never on its command line; the UI and
    analytics are off; ``home`` is its ``PREFECT_HOME``. Stops the whole process group on exit.
    """
    port = free_port()
    cmd = ["bash", str(PREFECT_SERVER_SCRIPT), "--host", "127.0.0.1", "--port", str(port)]
    full_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    full_env.update(
        PREFECT=str(Path(sys.executable).parent / "prefect"),
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_UI_ENABLED="false",
    )
    home.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    health = f"{api}/health"
    with _served(cmd, full_env, log, health=health, what="prefect server", timeout=timeout):
        yield api
