"""Real servers for tests: an MLflow tracking server on 127.0.0.1, started and stopped here.

    from servers import start_mlflow_server

    with start_mlflow_server(tmp_path) as uri:          # sqlite backend + artifacts in tmp_path
        ...
    with start_mlflow_server(tmp_path, backend_uri="postgresql://...") as uri:
        ...

The `mlflow_server` fixture (module scope) yields the URI of one such server; a test module
imports it with `from servers import mlflow_server  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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
