"""A sweep is one MLflow parent run; each of its jobs is a child run nested under it.

`SweepTracking` is a Hydra callback (registered under `hydra.callbacks` in conf/train.yaml):

    on_multirun_start   find or create the sweep's parent run and export its id to the jobs
    on_job_end          a job that failed shows as a FAILED child run, even one that failed
                        before `train` could create its run
    on_multirun_end     build the sweep's report (src/report.py) and end the parent FINISHED

A job finds its parent through `$TBPTT_PARENT_RUN_ID`, which every job started from the sweep
process inherits (in-process, joblib and submitit_local launchers). A job on another host,
without that variable, searches for the parent run whose tag `sweep.id` equals the id it
derives from its own Hydra config (`sweep_id`): the Optuna study name and storage when the
sweeper has them, else the sweep folder.

A sweep that fails ends its parent FAILED, one interrupted (Ctrl-C, SIGTERM) ends it KILLED.
MLflow is imported inside functions: Hydra loads this module at the start of every command.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:
    from hydra.core.utils import JobReturn
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "TBPTT_PARENT_RUN_ID"
SWEEP_ID_ENV = "TBPTT_SWEEP_ID"
SWEEP_KEYS_ENV = "TBPTT_SWEEP_KEYS"
WORKER_ENV = "TBPTT_SWEEP_WORKER"

SWEEP_ID_TAG = "sweep.id"
ROLE_TAG = "sweep.role"
WORKER_TAG = "sweep.worker"
JOB_TAG = "sweep.job"
TRIAL_STATE_TAG = "trial.state"
TRIAL_NUMBER_TAG = "trial.number"
ERROR_TAG = "trial.error"

# Optuna reads study names and storage URLs from these sweeper keys.
STUDY_NAME_KEY = "study_name"
STORAGE_KEY = "storage"
TRIAL_NUMBER_KEY = "sweeper.trial.number"  # under `hydra`, set per job by the Optuna sweeper


@dataclass(frozen=True)
class Sweep:
    """What identifies a sweep and what its parent run is tagged with."""

    sweep_id: str
    name: str
    kind: str  # "optuna" or "grid"
    swept_keys: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()  # the command line's, secrets masked

    @property
    def resumable(self) -> bool:
        """An Optuna study can be continued by a later command, in the same parent run."""
        return self.kind == "optuna"


def sweep_id(hydra_cfg: DictConfig, cwd: str | Path) -> str:
    """The id every process of one sweep derives alike, on any host, from the Hydra config.

    An Optuna sweep is its study (name and storage): workers that share a study share the
    parent. Any other sweep is its output folder, which Hydra stamps with the launch time.
    """
    study_name, storage = _study(hydra_cfg)
    sweep_dir = _absolute(hydra_cfg.sweep.dir, cwd)
    if study_name is not None:
        identity = f"optuna\n{study_name}\n{_absolute_storage(storage, cwd) or sweep_dir}"
        label = study_name
    else:
        identity = f"grid\n{sweep_dir}"
        label = "grid"
    digest = hashlib.sha1(identity.encode()).hexdigest()[:12]
    return f"{_slug(label)}-{digest}"


def describe_sweep(cfg: DictConfig, cwd: str | Path) -> Sweep:
    """The sweep that `python -m src.train -m ...` starts, from its composed config (no I/O)."""
    from src.report import infer_direction
    from src.tracking import mask_override, mask_uri

    hydra_cfg = cfg.hydra
    study_name, storage = _study(hydra_cfg)
    swept_keys = swept_parameters(hydra_cfg)
    choice = OmegaConf.select(hydra_cfg, "runtime.choices.sweep", default=None)
    overrides = [mask_override(override) for override in sweep_overrides(hydra_cfg)]
    name = study_name or choice or (" ".join(overrides) if overrides else "sweep")
    task = [mask_override(str(item)) for item in hydra_cfg.overrides.task]

    objectives = _as_list(cfg.get("optimized_metric", "val/loss"))
    directions = _as_list(OmegaConf.select(hydra_cfg, "sweeper.direction", default=None))
    if len(directions) != len(objectives):
        directions = [infer_direction(metric) for metric in objectives]

    identity = sweep_id(hydra_cfg, cwd)
    tags = {
        SWEEP_ID_TAG: identity,
        ROLE_TAG: "parent",
        "sweep.kind": "optuna" if study_name is not None else "grid",
        "sweep.name": name,
        "sweep.dir": _absolute(hydra_cfg.sweep.dir, cwd),
        "sweep.params": ",".join(swept_keys),
        "sweep.objective": ",".join(objectives),
        "sweep.direction": ",".join(directions),
        "sweep.overrides": " ".join(task)[:5000],
        "mlflow.source.name": "src.train -m",
    }
    if study_name is not None:
        tags["optuna.study_name"] = study_name
        storage_uri = _absolute_storage(storage, cwd)
        if storage_uri:
            tags["optuna.storage"] = mask_uri(storage_uri)
    return Sweep(identity, name[:250], tags["sweep.kind"], tuple(swept_keys), tags, tuple(task))


def swept_parameters(hydra_cfg: DictConfig) -> list[str]:
    """Config keys the sweep varies: the sweeper's `params` and the sweep overrides."""
    keys = []
    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None)
    if isinstance(params, DictConfig):
        keys.extend(str(key) for key in params)
    for override in _parsed_overrides(hydra_cfg):
        if override.is_sweep_override():
            keys.append(override.get_key_element().lstrip("+~"))
    return list(dict.fromkeys(keys))


def sweep_overrides(hydra_cfg: DictConfig) -> list[str]:
    """The command-line overrides that sweep, e.g. `tbptt.k=2,4,8`."""
    return [
        override.input_line
        for override in _parsed_overrides(hydra_cfg)
        if override.is_sweep_override() and override.input_line
    ]


def _parsed_overrides(hydra_cfg: DictConfig) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [str(item) for item in OmegaConf.select(hydra_cfg, "overrides.task", default=[])]
    try:
        return OverridesParser.create().parse_overrides(lines)
    except Exception:  # Hydra has parsed these once already; be lenient the second time.
        return []


def _study(hydra_cfg: DictConfig) -> tuple[str | None, str | None]:
    sweeper = OmegaConf.select(hydra_cfg, "sweeper", default=None)
    if not isinstance(sweeper, DictConfig):
        return None, None
    study_name = sweeper.get(STUDY_NAME_KEY)
    storage = sweeper.get(STORAGE_KEY)
    return (
        None if study_name is None else str(study_name),
        None if storage is None else str(storage),
    )


def _absolute(path: Any, cwd: str | Path) -> str:
    folder = Path(str(path))
    return str(folder if folder.is_absolute() else (Path(cwd) / folder).resolve())


def _absolute_storage(storage: str | None, cwd: str | Path) -> str | None:
    """A storage URL with a relative file path made absolute, so that it names one place."""
    if not storage:
        return None
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        return "sqlite:///" + _absolute(storage.removeprefix("sqlite:///"), cwd)
    if "://" not in storage:  # a journal file
        return _absolute(storage, cwd)
    return storage


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "sweep"


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, ListConfig | list | tuple):
        return [str(item) for item in value]
    return [str(value)]


# ---- the parent run ----------------------------------------------------------------------


def find_parent(
    client: MlflowClient, experiment_id: str, sweep_id: str, running_only: bool = False
) -> str | None:
    """The id of the sweep's parent run, the oldest if several exist; None if there is none."""
    query = f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = 'parent'"
    if running_only:
        query += " AND attributes.status = 'RUNNING'"
    runs = client.search_runs(
        [experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def find_or_create_parent(
    client: MlflowClient, experiment_id: str, sweep: Sweep
) -> tuple[str, bool]:
    """The sweep's parent run id, and whether this call created it.

    An Optuna sweep reuses its parent in any state (a later command continues the study);
    a grid reuses only a parent that is still RUNNING. A parent found ended is set RUNNING.

    Not atomic: two processes that both find nothing both create one. Workers that start the
    same sweep at once must hold a lock shared between them around this call (for instance
    a database advisory lock keyed on `sweep.sweep_id`). Every lookup picks the oldest
    parent, so even duplicates would not split the children.
    """
    run_id = find_parent(client, experiment_id, sweep.sweep_id, running_only=not sweep.resumable)
    if run_id is not None:
        if client.get_run(run_id).info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id, False
    run = client.create_run(experiment_id, run_name=sweep.name, tags=_with_commit(sweep.tags))
    return run.info.run_id, True


def _with_commit(tags: dict[str, str]) -> dict[str, str]:
    from src.tracking import git_commit

    commit = git_commit()
    return tags | ({"mlflow.source.git.commit": commit} if commit else {})


# ---- the jobs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRun:
    """How `train` names and nests its run."""

    parent_run_id: str | None
    run_name: str | None
    tags: dict[str, str]


def job_run(client: MlflowClient, cfg: DictConfig, hydra_cfg: DictConfig) -> JobRun:
    """A child of the sweep's parent in a multirun; a top-level run otherwise.

    Args:
        client: The client of the store the run goes to.
        cfg: The job's config (`logger.run_name`, `logger.experiment_name`).
        hydra_cfg: `HydraConfig.get()` in the job.
    """
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return JobRun(None, cfg.logger.run_name, {})

    identity = os.environ.get(SWEEP_ID_ENV) or sweep_id(hydra_cfg, hydra_cfg.runtime.cwd)
    parent_run_id = os.environ.get(PARENT_RUN_ENV)
    if not parent_run_id:
        from src.tracking import get_or_create_experiment

        experiment_id = get_or_create_experiment(client, cfg.logger.experiment_name)
        parent_run_id = find_parent(client, experiment_id, identity)
        if parent_run_id is None:
            log.warning(
                "no parent run with tag %s=%s in experiment %r; this job's run is top-level",
                SWEEP_ID_TAG, identity, cfg.logger.experiment_name,
            )
    tags = job_tags(hydra_cfg, identity, os.environ.get(WORKER_ENV, _worker()))
    return JobRun(parent_run_id, cfg.logger.run_name or child_run_name(hydra_cfg), tags)


def job_tags(hydra_cfg: DictConfig, identity: str, worker: str) -> dict[str, str]:
    """The tags of a job's child run: its sweep, job number, worker and Optuna trial."""
    tags = {
        SWEEP_ID_TAG: identity,
        ROLE_TAG: "trial",
        JOB_TAG: str(hydra_cfg.job.num),
        WORKER_TAG: worker,
    }
    # The Optuna sweeper names the trial a job runs; the report matches runs to trials by it.
    trial_number = OmegaConf.select(hydra_cfg, TRIAL_NUMBER_KEY, default=None)
    if trial_number is not None:
        tags[TRIAL_NUMBER_TAG] = str(trial_number)
    return tags


def child_run_name(hydra_cfg: DictConfig) -> str:
    """`#3 tbptt.k=8, optimizer.lr=0.01`: the job number and the values swept."""
    from src.tracking import mask_override

    keys = [key for key in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if key]
    if not keys:
        params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None)
        keys = [str(key) for key in params] if isinstance(params, DictConfig) else []
    chosen = []
    for override in (str(item) for item in hydra_cfg.overrides.task):
        key = override.split("=", 1)[0].lstrip("+~")
        if not keys or key in keys:
            chosen.append(mask_override(override.lstrip("+~")))
    return f"#{hydra_cfg.job.num} {', '.join(chosen)}".strip()[:250]


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---- the callback ------------------------------------------------------------------------


class SweepTracking(Callback):
    """Hydra callback: one MLflow parent run per multirun, with the sweep's report."""

    def __init__(self, report: bool = True) -> None:
        self.report = report
        self._parent_run_id: str | None = None
        self._uri: str | None = None
        self._sweep: Sweep | None = None
        self._sweep_dir: Path | None = None
        self._study: tuple[str, str | None] | None = None
        self._ended = False
        self._terminated = False
        self._pid = 0
        self._previous_sigterm: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Launchers pickle the callbacks to their workers; the signal handler stays here.
        state = dict(self.__dict__)
        state["_previous_sigterm"] = None
        return state

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from src import tracking

        cwd = Path.cwd()
        self._uri = tracking.resolve_tracking_uri(config.logger.tracking_uri, cwd)
        client = tracking.client_for(self._uri)
        experiment_id = tracking.get_or_create_experiment(client, config.logger.experiment_name)
        self._sweep = describe_sweep(config, cwd)
        self._sweep_dir = Path(self._sweep.tags["sweep.dir"])
        study_name, storage = _study(config.hydra)
        if study_name is not None:
            self._study = (study_name, _absolute_storage(storage, cwd))

        # Workers of one study start together: under a lock they share, one creates the
        # parent and the others find it.
        lock: Any = contextlib.nullcontext()
        if self._study is not None and self._study[1]:
            from hydra_plugins.tbptt_optuna_sweeper.workers import study_lock

            lock = study_lock(self._study[1], f"mlflow-parent:{self._sweep.sweep_id}")
        with lock:
            self._parent_run_id, created = find_or_create_parent(
                client, experiment_id, self._sweep
            )
        os.environ[PARENT_RUN_ENV] = self._parent_run_id
        os.environ[SWEEP_ID_ENV] = self._sweep.sweep_id
        os.environ[SWEEP_KEYS_ENV] = ",".join(self._sweep.swept_keys)
        os.environ.setdefault(WORKER_ENV, _worker())
        if created:
            client.log_text(
                self._parent_run_id,
                "\n".join(self._sweep.overrides) + "\n",
                "sweep/overrides.txt",
            )
        log.info(
            "Sweep %r: MLflow parent run %s (%s) in experiment %r",
            self._sweep.name, self._parent_run_id, "created" if created else "found",
            config.logger.experiment_name,
        )
        self._pid = os.getpid()
        atexit.register(self._end_at_exit)
        self._catch_sigterm()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        hydra_cfg = config.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN or job_return.status != JobStatus.FAILED:
            return
        error = job_return._return_value  # the exception; `.return_value` would raise it
        if type(error).__name__ == "TrialPruned":
            return  # stopped by the Optuna pruner, not failed: train() ended its run KILLED
        record_failed_job(config, hydra_cfg, error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end("FINISHED")

    # ---- ending ----------------------------------------------------------------------------

    def _end_at_exit(self) -> None:
        if os.getpid() != self._pid:
            return
        interrupted = self._terminated or isinstance(
            getattr(sys, "last_value", None), KeyboardInterrupt
        )
        # Lightning turns Ctrl-C and SIGTERM during a fit into SystemExit, which leaves no
        # trace here; the job's run, ended KILLED, still tells.
        with contextlib.suppress(Exception):
            interrupted = interrupted or self._trial_killed()
        self._end("KILLED" if interrupted else "FAILED")

    def _trial_killed(self) -> bool:
        from src import tracking

        client = tracking.client_for(self._uri)
        experiment_id = client.get_run(self._parent_run_id).info.experiment_id
        runs = client.search_runs(
            [experiment_id],
            f"tags.mlflow.parentRunId = '{self._parent_run_id}' AND attributes.status = "
            f"'KILLED' AND tags.`{WORKER_TAG}` = '{os.environ.get(WORKER_ENV, '')}'",
        )
        # A pruned trial also ends KILLED, on purpose.
        return any(run.data.tags.get(TRIAL_STATE_TAG) != "PRUNED" for run in runs)

    def _end(self, status: str) -> None:
        """Report on the parent and end it with `status`, once."""
        if self._ended or self._parent_run_id is None or self._uri is None:
            return
        self._ended = True
        with contextlib.suppress(Exception):
            atexit.unregister(self._end_at_exit)
        self._restore_sigterm()

        from src import tracking

        client = tracking.client_for(self._uri)
        parent = self._parent_run_id
        if self.report and status != "KILLED":
            self._build_report(client, parent)
        elif status == "KILLED":
            log.info("Sweep interrupted; `python -m src.report %s` builds its report", parent)

        still_running = other_workers_running(client, parent, os.environ.get(WORKER_ENV, ""))
        if still_running:
            log.info(
                "%d trial(s) of this sweep still run in other workers; the last to finish "
                "ends the parent run %s", still_running, parent,
            )
            return
        client.set_terminated(parent, status)

    def _build_report(self, client: MlflowClient, parent: str) -> None:
        from src import report

        out_dir = (self._sweep_dir or Path.cwd()) / "report"
        try:
            study = report.load_study(*self._study) if self._study else None
        except Exception as error:
            log.warning("could not load the Optuna study %s: %s", self._study, error)
            study = None
        try:
            summary = report.build_report(client, parent, out_dir, study=study)
        except Exception:
            log.exception("the sweep's report failed; `python -m src.report %s` retries", parent)
            return
        log.info("%s\nReport: %s (also on run %s)", summary.headline(), out_dir, parent)

    def _catch_sigterm(self) -> None:
        # SIGTERM (a scheduler, `kill`) would end Python without atexit: make it an exit.
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            self._terminated = True
            raise SystemExit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is None:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._previous_sigterm = None


def other_workers_running(client: MlflowClient, parent_run_id: str, worker: str) -> int:
    """How many child runs of the parent are RUNNING in workers other than `worker`."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' AND attributes.status = 'RUNNING'",
        max_results=1000,
    )
    return sum(1 for run in runs if run.data.tags.get(WORKER_TAG, worker) != worker)


def record_failed_job(config: DictConfig, hydra_cfg: DictConfig, error: BaseException) -> None:
    """Mark the job's child run FAILED, or create one if the job failed before it had a run."""
    from src import tracking

    message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:5000]
    parent_run_id = os.environ.get(PARENT_RUN_ENV)
    identity = os.environ.get(SWEEP_ID_ENV)
    if not parent_run_id or not identity:
        return
    uri = tracking.resolve_tracking_uri(config.logger.tracking_uri, hydra_cfg.runtime.cwd)
    client = tracking.client_for(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    worker = os.environ.get(WORKER_ENV, _worker())
    query = (
        f"tags.mlflow.parentRunId = '{parent_run_id}' AND tags.`{JOB_TAG}` = "
        f"'{hydra_cfg.job.num}' AND tags.`{WORKER_TAG}` = '{worker}'"
    )
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = _create_failed_run(client, config, hydra_cfg, parent_run_id, identity, worker)
    client.set_tag(run_id, TRIAL_STATE_TAG, "FAIL")
    client.set_tag(run_id, ERROR_TAG, message)
    client.set_terminated(run_id, "FAILED")


def _create_failed_run(
    client: MlflowClient,
    config: DictConfig,
    hydra_cfg: DictConfig,
    parent_run_id: str,
    identity: str,
    worker: str,
) -> str:
    from src import tracking

    task_cfg = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    tags = job_tags(hydra_cfg, identity, worker)
    name = child_run_name(hydra_cfg)
    try:
        return tracking.create_run(
            client,
            task_cfg,
            run_name=name,
            overrides=[str(item) for item in hydra_cfg.overrides.task],
            parent_run_id=parent_run_id,
            extra_tags=tags,
        )
    except Exception:
        # The config itself may be what failed; a bare run still counts the trial.
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        tags["mlflow.parentRunId"] = parent_run_id
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
