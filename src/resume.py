"""Interrupted runs: stop cleanly, and resume in the same MLflow run.

Every checkpoint carries the id of the MLflow run it belongs to. A run stopped by Ctrl-C or
SIGTERM ends KILLED with the last completed epoch in `<output dir>/checkpoints/last.ckpt`, and

    python -m src.train <the same overrides> ckpt_path=<that last.ckpt>

reopens that run and trains on from the epoch after the saved one, so its metric history
continues where it stopped instead of starting a second run.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback

from src.config import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

RUN_ID_KEY = "mlflow_run_id"
RESUMED_TAG = "resumed_from"

# Keys that may change between the interrupted command and the one that resumes it: they say
# how and where to train, not what is trained.
MAY_CHANGE = ("ckpt_path", "trainer.max_epochs", "trainer.enable_progress_bar",
              "trainer.num_threads", "logger.")


class RunIdInCheckpoint(Callback):
    """Writes the MLflow run id into every checkpoint Lightning saves."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        # A plain str: checkpoints are loaded with weights_only=True, which allows no objects.
        checkpoint[RUN_ID_KEY] = str(self.run_id)


def checkpoint_run_id(path: str | Path) -> str | None:
    """The MLflow run id saved in a checkpoint (None if none was); `ConfigError` if unsafe."""
    import torch

    # weights_only: a checkpoint is data, and unpickling arbitrary objects would run code.
    # mmap: the id is all that is read here, not the tensors.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"ckpt_path must be a checkpoint that loads with weights_only=True (tensors and "
            f"plain values only), but {str(path)!r} does not: {type(error).__name__}: {reason}"
        ) from None
    run_id = checkpoint.get(RUN_ID_KEY) if isinstance(checkpoint, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def reopen_run(client: MlflowClient, ckpt_path: str, params: dict[str, str]) -> str | None:
    """Set the run that `ckpt_path` belongs to RUNNING again and return its id.

    Returns None when the checkpoint names no run or the run is not in this tracking store;
    the caller then starts a new run. Raises `ConfigError` when the run was trained with a
    different config (`params` are this command's, as `tracking.config_params` makes them).
    """
    run_id = checkpoint_run_id(ckpt_path)
    if run_id is None:
        log.warning("%s names no MLflow run; training resumes in a new run", ckpt_path)
        return None
    try:
        run = client.get_run(run_id)
    except Exception:
        log.warning("MLflow run %s of %s is not in this tracking store; training resumes in "
                    "a new run", run_id, ckpt_path)
        return None

    changed = [
        f"{key}={run.data.params[key]} (now {value})"
        for key, value in sorted(params.items())
        if key in run.data.params and run.data.params[key] != value and not _may_change(key)
    ]
    if changed:
        raise ConfigError(
            f"ckpt_path resumes MLflow run {run_id}, which was trained with "
            f"{', '.join(changed)}. Repeat that run's overrides (its artifact "
            f"config/overrides.txt lists them) and add ckpt_path, or leave out ckpt_path to "
            f"start a new run."
        )
    # The new run's checkpoint folder differs from the old one's, as it should; Lightning
    # warns about exactly that.
    warnings.filterwarnings("ignore", message=".*dirpath has changed.*")
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, RESUMED_TAG, str(Path(ckpt_path).resolve()))
    log.info("resuming MLflow run %s from %s", run_id, ckpt_path)
    return run_id


def _may_change(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in MAY_CHANGE)


def interrupted(error: BaseException, run_id: str, last_ckpt: Path, overrides: list[str]) -> int:
    """Tell the user how to resume, and return the exit status for the signal that stopped us.

    Lightning turns Ctrl-C into `sys.exit(1)` and SIGTERM into a `SystemExit` without a code
    (which would exit 0); the shell conventions 130 and 143 say which signal it was. An exit
    that already carries such a status (a sweep's own SIGTERM handler) keeps it.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    code = 128 + (signal.SIGTERM if isinstance(error, SIGTERMException) else signal.SIGINT)
    if isinstance(error, SystemExit) and isinstance(error.code, int) and error.code > 128:
        code = error.code
    if last_ckpt.exists():
        from src.tracking import mask_override

        kept = [mask_override(arg) for arg in overrides if not arg.startswith("ckpt_path=")]
        kept.append(f"ckpt_path={last_ckpt.resolve()}")
        command = " ".join(["python -m src.train", *map(shlex.quote, kept)])
        print(
            f"interrupted: MLflow run {run_id} ended KILLED. The last completed epoch is "
            f"saved; to train on in the same run:\n  {command}",
            file=sys.stderr,
        )
    else:
        print(f"interrupted: MLflow run {run_id} ended KILLED before its first epoch "
              f"completed; there is no checkpoint to resume from.", file=sys.stderr)
    return code
