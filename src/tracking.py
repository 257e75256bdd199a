"""MLflow: where runs are tracked, and what each run records.

The run is created here with MLflow's client rather than by Lightning's logger, so that its
tags, params and end state (FINISHED, FAILED or KILLED) are ours to set; Lightning's logger is
then attached to the run by id and only writes metrics.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from src.config import flatten

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SECRET_KEY = re.compile(r"pass(word)?|secret|token|api_?key", re.IGNORECASE)
SECRET_SETTING = re.compile(
    r"(?P<key>[\w.+~]*(?:pass(?:word)?|secret|token|api_?key)\w*=)[^\s,]+", re.IGNORECASE
)
# Hydra escapes the colons of the overrides it logs: `postgresql\://user\:pw@host`.
URI_PASSWORD = re.compile(r"(?P<user>\b[a-zA-Z][a-zA-Z0-9+.-]*\\?://[^\s:/@\\]*\\?:)[^\s/]+@")

# An MLflow client pointed at a dead server retries for minutes by default; these make it
# give up within seconds. Set before mlflow is imported, and only where the user has not.
FAST_FAIL_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}

# Tracking stores that are databases on a server, and how to bound the wait for a connection.
DATABASE_TIMEOUT_ARGS = {
    "postgresql": {"connect_timeout": 5},
    "mysql": {"connect_timeout": 5},
    "mssql": {"timeout": 5},
}


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used."""


def resolve_tracking_uri(configured: str | None, cwd: str | Path | None = None) -> str:
    """`logger.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in `cwd`."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    folder = Path(cwd) if cwd is not None else Path.cwd()
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def mask_uri(text: str) -> str:
    """Hide the password of every URI in `text`: `postgresql://user:***@host/db`.

    The password runs to the last `@` before the host, so one that holds an `@` is hidden
    whole; the URI may stand alone or inside a message.
    """
    return URI_PASSWORD.sub(r"\g<user>***@", text)


def mask_value(key: str, value: Any) -> Any:
    """The value to record for a config key: secrets and passwords in URIs are masked."""
    if isinstance(value, str):
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value:
            return "***"
        if "://" in value:
            return mask_uri(value)
    return value


def mask_text(text: str) -> str:
    """`text` with URI passwords and `password=...`-style settings masked."""
    return SECRET_SETTING.sub(r"\g<key>***", mask_uri(text))


class MaskSecretsInLogs(Callback):
    """A Hydra callback that masks secrets in every log record from the start of a command.

    Hydra logs each job's overrides, and sets up fresh log handlers more than once, so the
    masking is done where records are made rather than by a handler's filter.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        mask_secrets_in_logs()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        mask_secrets_in_logs()


def mask_secrets_in_logs() -> None:
    """Make every log record of this process with a secret in its message show `***`."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "masks_secrets", False):
        return

    def make_masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    make_masked_record.masks_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_masked_record)


def mask_override(override: str) -> str:
    """A command-line override `key=value` as it may be shown: its value masked as needed."""
    key, equals, value = override.partition("=")
    return f"{key}{equals}{mask_value(key, value)}" if equals else override


def client_for(uri: str) -> MlflowClient:
    """An MLflow client for `uri` that fails fast and says which store it could not reach."""
    for name, value in FAST_FAIL_ENV.items():
        os.environ.setdefault(name, value)

    try:
        # Before importing MLflow (seconds): a store that is down is reported at once.
        _probe(uri)

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as error:
        raise TrackingError(
            f"cannot reach the MLflow tracking store at {mask_uri(uri)}: "
            f"{type(error).__name__}: {_first_line(error)}. Start the server, or set "
            f"logger.tracking_uri (or MLFLOW_TRACKING_URI) to a store that is up."
        ) from None
    return client


def _probe(uri: str) -> None:
    """Connect once to a tracking server or database; raise if nothing answers."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("http", "https"):
        parts = urlsplit(uri)
        port = parts.port or (443 if scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "localhost", port), timeout=5):
            return
    if scheme not in DATABASE_TIMEOUT_ARGS:
        return
    # MLflow retries a database it cannot connect to ten times, backing off for about 100 s
    # in all, with no setting to shorten it; one connection with a timeout answers at once.
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args=DATABASE_TIMEOUT_ARGS[scheme])
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _first_line(error: BaseException) -> str:
    return mask_uri(str(error).strip().splitlines()[0]) if str(error).strip() else ""


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        # Another process created it between our lookup and our create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {
        "dataset": str(cfg.data.name),
        "model": str(cfg.model.name),
        "tbptt.mode": str(cfg.tbptt.mode),
        "mlflow.source.name": "src.train",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    user_tags = (cfg.logger.tags or {}).items()
    tags.update({str(key): str(mask_value(str(key), value)) for key, value in user_tags})
    return tags


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat MLflow params: `tbptt.k`, `optimizer.lr`, ..."""
    params = {}
    for key, value in flatten(cfg):
        value = mask_value(key, value)
        params[key] = "null" if value is None else str(value)[:6000]
    return params


def create_run(
    client: MlflowClient,
    cfg: DictConfig,
    run_name: str | None,
    overrides: list[str],
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Create the run, record the config as params and artifacts, and return its id."""
    from mlflow.entities import Param

    experiment_id = get_or_create_experiment(client, cfg.logger.experiment_name)
    tags = run_tags(cfg) | (extra_tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id

    # MLflow takes at most 100 params per call.
    params = [Param(key, value) for key, value in config_params(cfg).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])

    resolved = OmegaConf.to_yaml(_masked_config(cfg), resolve=True)
    client.log_text(run_id, resolved, "config/config.yaml")
    masked = [mask_override(override) for override in overrides]
    client.log_text(run_id, "\n".join(masked) + "\n", "config/overrides.txt")
    return run_id


def _masked_config(cfg: DictConfig) -> DictConfig:
    container = OmegaConf.to_container(cfg, resolve=True)

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {key: walk(value, f"{prefix}{key}.") for key, value in node.items()}
        return mask_value(prefix.rstrip("."), node)

    return OmegaConf.create(walk(container, ""))
