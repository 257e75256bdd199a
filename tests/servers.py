"""Real servers for tests: an MLflow tracking server and PostgreSQL on 127.0.0.1.

    from servers import start_mlflow_server

    with start_mlflow_server(tmp_path) as uri:          # sqlite backend + artifacts in tmp_path
        ...
    with start_mlflow_server(tmp_path, backend_uri="postgresql://...") as uri:
        ...

The `mlflow_server` fixture (module scope) yields the URI of one such server; a test module
imports it with `from servers import mlflow_server  # noqa: F401`.

    with start_postgres() as pg:                          # a fresh server in a temporary folder
        url = pg.create_database("study")                 # postgresql://user:pw@127.0.0.1:port/study

The `postgres` fixture (session scope) yields one such server; tests create their own databases.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Lean: one worker and no job runner start in about 10 s and 500 MB instead of 3 GB.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
START_TIMEOUT_S = 90.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Return once `url` answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {process.returncode} before answering {url}; "
                f"its log ends:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"no answer from {url} within {timeout:.0f} s; log:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_process_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group `process` leads, SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


@contextlib.contextmanager
def start_mlflow_server(folder: Path, backend_uri: str | None = None) -> Iterator[str]:
    """Run `mlflow server` on a free port of 127.0.0.1 and yield its URI; stop it on exit.

    Args:
        folder: Where the server keeps its artifacts, its log and, unless `backend_uri` is
            given, its SQLite database.
        backend_uri: The backend store, e.g. a PostgreSQL URI; default SQLite in `folder`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    backend_uri = backend_uri or f"sqlite:///{folder / 'mlflow-server.db'}"
    port = free_port()
    log_path = folder / "mlflow-server.log"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(folder / "mlflow-artifacts"),
    ]
    env = {**os.environ, **MLFLOW_SERVER_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "w") as log:
        # A session of its own, so that stopping it also stops the workers it forks.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", process, log_path, START_TIMEOUT_S)
        yield uri
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URI of an MLflow server (SQLite backend) that lives as long as the test module."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


# ---- PostgreSQL -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    """A running throwaway PostgreSQL server: where it listens and how to log in."""

    host: str
    port: int
    user: str
    password: str

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (the form Optuna and MLflow take) for `database`."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create the database `name` and return its URL."""
        import psycopg

        # CREATE DATABASE cannot run inside a transaction.
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def postgres_bindir() -> Path:
    """The folder of `initdb` and `pg_ctl`: Debian's newest, else whatever is on PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError(
        "PostgreSQL's initdb was not found in /usr/lib/postgresql/*/bin or on PATH; "
        "install it with `bash .ci/setup` (Debian package `postgresql`)."
    )


@contextlib.contextmanager
def start_postgres(user: str = "tbptt", password: str = "tbptt-test-pw") -> Iterator[Postgres]:
    """Run a fresh PostgreSQL server on a free port of 127.0.0.1; stop and delete it on exit.

    PostgreSQL refuses to run as root, so as root `initdb` and `pg_ctl` run as the `postgres`
    user, with the data, the socket and the log in a folder that user owns. Logins over TCP
    need the password (scram-sha-256), as on a real server.
    """
    bindir = postgres_bindir()
    base = Path(tempfile.mkdtemp(prefix="tbptt-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, sockets, log_path = base / "data", base / "sockets", base / "server.log"
    password_file = base / "password"

    def run(*command: str) -> None:
        result = subprocess.run(
            [*as_owner, *command], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command[:2])} failed ({result.returncode}): {result.stderr.strip()}"
                f"\n{_tail(log_path)}"
            )

    port = free_port()
    started = False
    try:
        run("mkdir", "-p", str(sockets))
        run("sh", "-c", f"umask 077 && printf %s '{password}' > {password_file}")
        run(
            str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={password_file}",
            "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync",
        )
        # fsync off: a test database need not survive a power cut, and it starts and commits
        # faster. Enough connections for several workers and an MLflow server.
        options = (
            f"-p {port} -k {sockets} -h 127.0.0.1 -c fsync=off -c max_connections=200"
        )
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log_path),
            "-w", "-t", "60", "start")
        started = True
        yield Postgres("127.0.0.1", port, user, password)
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL server for the test session; each test creates its own database."""
    with start_postgres() as server:
        yield server
