"""Shared fixtures: compose the real configs, and run the real entry point as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# Small enough that a run takes seconds on two cores, big enough to have several windows.
TINY_RUN = [
    "model.hidden_size=8",
    "model.embedding_dim=4",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
]
TINY = ["data.n_train=32", "data.n_val=16", "data.seq_len=24", "data.batch_size=8", *TINY_RUN]


def compose(overrides: list[str] | None = None):
    """The config `python -m src.train <overrides>` would run, with Hydra's runtime filled in."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides or [], return_hydra_config=True)


def with_defaults(args: list[str], defaults: list[str]) -> list[str]:
    """`args` plus each default override whose key `args` does not set itself."""
    keys = {arg.split("=", 1)[0].lstrip("+~") for arg in args if "=" in arg}
    return args + [d for d in defaults if d.split("=", 1)[0] not in keys]


def subprocess_env(tracking_uri: str | None = None, threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    # Two processes on two cores at two threads each run many times slower than at one.
    env["OMP_NUM_THREADS"] = str(threads)
    env["HYDRA_FULL_ERROR"] = "1"
    return env


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def run_train(tmp_path: Path, tracking_uri: str) -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m src.train <args>` in `tmp_path` against a fresh SQLite MLflow store."""

    def run(*args: str, timeout: float = 300, env: dict | None = None, tiny: bool = True):
        # Text has no n_train or n_val: its size is the file's.
        small = TINY if tiny and "data=text" not in args else TINY_RUN
        defaults = [*small, "trainer.num_threads=1"]
        command = [sys.executable, "-m", "src.train", *with_defaults(list(args), defaults)]
        return subprocess.run(
            command,
            cwd=tmp_path,
            env=env or subprocess_env(tracking_uri),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
