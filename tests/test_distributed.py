"""One sweep, many workers: the same command in several processes shares one Optuna study.

Real servers only: a PostgreSQL started for the session (tests/servers.py) holds the studies
and the MLflow server's runs; an `mlflow server` on 127.0.0.1 is what the workers log to.
Each worker is `python -m src.train -m sweep=k_lr ...` in a process of its own, as a user
would start it on another GPU or host.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY, subprocess_env
from servers import (  # noqa: F401 (the postgres fixture)
    Postgres,
    free_port,
    postgres,
    start_mlflow_server,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

N_TRIALS = 6
N_WORKERS = 3
# Beats every second and a trial silent for 10 s is stale: a killed worker's trial is run
# again within seconds instead of the default minute.
FAST_HEARTBEAT = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=10"]


@pytest.fixture(scope="module")
def tracking_server(postgres: Postgres, tmp_path_factory) -> Iterator[str]:  # noqa: F811
    """An MLflow server on PostgreSQL, as in docker/compose.yaml."""
    backend = postgres.create_database(f"mlflow_{os.getpid()}")
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow"), backend_uri=backend) as uri:
        yield uri


def sweep_command(storage: str, study: str, sweep_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "src.train", "-m", "sweep=k_lr",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={N_TRIALS}",
        # Every trial runs to the end (the pruner waits for more trials than there are), so
        # that "complete" counts all of them.
        "hydra.sweeper.pruner_options.n_startup_trials=1000",
        f"hydra.sweep.dir={sweep_dir}",
        f"logger.experiment_name={study}",
        *TINY,
        "trainer.num_threads=1",
        *extra,
    ]


def start_workers(command: list[str], tracking_uri: str, tmp_path: Path) -> list[subprocess.Popen]:
    workers = []
    for index in range(N_WORKERS):
        log = open(tmp_path / f"worker{index}.log", "w")  # noqa: SIM115 (closed by the OS)
        workers.append(subprocess.Popen(
            command, cwd=tmp_path, env=subprocess_env(tracking_uri), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        ))
    return workers


def wait_all(workers: list[subprocess.Popen], tmp_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    try:
        for index, worker in enumerate(workers):
            if worker.returncode is not None and worker.returncode < 0:
                continue  # the one the test killed
            code = worker.wait(timeout=max(1.0, deadline - time.monotonic()))
            log = (tmp_path / f"worker{index}.log").read_text()
            assert code == 0, f"worker {index} exited {code}:\n{log[-4000:]}"
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def kill_mid_trial(worker: subprocess.Popen, storage: str, study: str) -> int:
    """Wait until `worker` runs a trial that has begun training, kill -9 it; the trial's number."""
    import optuna

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker ended before it ran a trial"
        try:
            trials = load(storage, study).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
            )
        except KeyError:  # the study does not exist yet
            trials = []
        for trial in trials:
            # The run id is set once the job has built its model and started training.
            if trial.user_attrs.get("sweeper_pid") == worker.pid and (
                "mlflow_run_id" in trial.user_attrs
            ):
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
                return trial.number
        time.sleep(0.1)
    raise AssertionError("no trial of the worker started within 300 s")


def mlflow_runs(tracking_uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def load(storage: str, study: str):
    """The study in a database (a URL) or a journal file (a path), as the sweeper opens it."""
    from hydra_plugins.tbptt_optuna_sweeper.study import load_study

    return load_study(storage, study)


def test_three_workers_share_one_study_on_postgres(postgres, tracking_server, tmp_path):  # noqa: F811
    storage = postgres.create_database(f"study_{free_port()}")
    command = sweep_command(storage, "shared", tmp_path / "multirun", *FAST_HEARTBEAT)
    wait_all(start_workers(command, tracking_server, tmp_path), tmp_path)

    trials = load(storage, "shared").get_trials(deepcopy=False)
    # Exactly n_trials: none lost, none run twice, however the workers raced.
    assert len(trials) == N_TRIALS
    assert sorted(t.number for t in trials) == list(range(N_TRIALS))
    assert all(t.state.name == "COMPLETE" for t in trials)
    # The work was shared out: more than one worker ran trials.
    assert len({t.user_attrs["sweeper_pid"] for t in trials}) >= 2

    # One parent run, created once however the workers raced; every trial's run under it.
    parents, children = mlflow_runs(tracking_server, "shared")
    assert len(parents) == 1
    assert len(children) == N_TRIALS
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {c.info.run_id for c in children}


def test_a_killed_workers_trial_is_failed_and_run_again(postgres, tracking_server, tmp_path):  # noqa: F811
    storage = postgres.create_database(f"study_{free_port()}")
    # Longer trials, so that the kill lands in the middle of one.
    command = sweep_command(storage, "killed", tmp_path / "multirun", *FAST_HEARTBEAT,
                            "trainer.max_epochs=6", "data.n_train=96")
    workers = start_workers(command, tracking_server, tmp_path)
    try:
        killed = kill_mid_trial(workers[0], storage, "killed")
    finally:
        wait_all(workers, tmp_path)

    trials = {t.number: t for t in load(storage, "killed").get_trials(deepcopy=False)}
    complete = [t for t in trials.values() if t.state.name == "COMPLETE"]
    assert len(complete) == N_TRIALS
    # The killed trial was found through its stopped heartbeat and failed ...
    assert trials[killed].state.name == "FAIL"
    assert "error" not in trials[killed].user_attrs  # not the trial's fault: not counted
    # ... and a live worker ran it again, with the same parameters.
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1
    assert retries[0].params == trials[killed].params
    assert len(trials) == N_TRIALS + 1

    # Its MLflow run does not show RUNNING for ever; all runs sit under the one parent.
    parents, children = mlflow_runs(tracking_server, "killed")
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_id = {c.info.run_id: c for c in children}
    assert by_id[trials[killed].user_attrs["mlflow_run_id"]].info.status == "KILLED"
    assert sum(c.info.status == "FINISHED" for c in children) == N_TRIALS


def test_workers_on_one_host_share_a_journal_file(tracking_server, tmp_path) -> None:
    """No database: a journal file, and a killed worker's trial found by its dead process."""
    journal = tmp_path / "study.journal"
    command = sweep_command(str(journal), "journal", tmp_path / "multirun",
                            "trainer.max_epochs=6", "data.n_train=96")
    workers = start_workers(command, tracking_server, tmp_path)
    try:
        killed = kill_mid_trial(workers[0], str(journal), "journal")
    finally:
        wait_all(workers, tmp_path)

    trials = load(str(journal), "journal").get_trials(deepcopy=False)
    states = {t.number: t.state.name for t in trials}
    assert sorted(states) == list(range(len(trials)))  # distinct numbers
    assert states[killed] == "FAIL"
    assert sum(state == "COMPLETE" for state in states.values()) == N_TRIALS
    parents, children = mlflow_runs(tracking_server, "journal")
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_submitit_local_launcher_runs_the_trials_as_jobs(tmp_path) -> None:
    """The SLURM path without a cluster: submitit's local mode runs each trial as a job."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "multirun"
    # `-m` before the overrides: submitit's launcher is picked by `hydra/launcher=...`.
    command = [
        sys.executable, "-m", "src.train", "-m", "hydra/launcher=submitit_local", "sweep=k_lr",
        f"hydra.sweeper.storage={tmp_path / 'study.journal'}",
        "hydra.sweeper.study_name=local", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.pruner_options.n_startup_trials=1000",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY, "trainer.num_threads=1",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(tracking_uri),
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The jobs' output lands in .submitit/ under the sweep folder, not on the console.
    logs = list((sweep_dir / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2, sorted((sweep_dir / ".submitit").rglob("*"))
    study = load(str(tmp_path / "study.journal"), "local")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    # The jobs ran in processes of their own, not in the sweeper's.
    parents, children = mlflow_runs(tracking_uri, "tbptt-lab")
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_slurm_launcher_config() -> None:
    from conftest import compose

    cfg = compose(["hydra/launcher=slurm"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    # Job logs beside the sweep's outputs, one folder per SLURM job.
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
