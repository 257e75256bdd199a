"""Sweeps as a user runs them: `python -m src.train -m ...` as subprocesses, on tiny data.

Each test reads what the sweep left behind: the Optuna study in its journal file, the MLflow
store, and optimization_results.yaml in the sweep folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hydra_plugins.tbptt_optuna_sweeper._sweep import Tally
from hydra_plugins.tbptt_optuna_sweeper.study import load_study
from tests.conftest import TINY, subprocess_env, with_defaults

pytestmark = pytest.mark.slow

# The sweep's MLflow report (plots, importances) is tested in test_sweep_tracking.py; here it
# would only cost seconds per sweep.
NO_REPORT = "+hydra.callbacks.sweep_tracking.report=false"


def results_of(tmp_path: Path, name: str) -> dict:
    return yaml.safe_load((tmp_path / "multirun" / name / "optimization_results.yaml").read_text())


def study_of(tmp_path: Path, name: str):
    return load_study(str(tmp_path / "multirun" / name / "optuna.journal"), name)


def training_runs(tracking_uri: str) -> list:
    """The runs that trained (a sweep's parent run has no config params)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [run for run in client.search_runs(experiments) if "tbptt.k" in run.data.params]


def check(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_a_grid_runs_one_job_per_k_and_each_returns_its_objective(run_train, tracking_uri):
    output = check(run_train("-m", "tbptt.k=2,4,8", "hydra.sweep.dir=multirun/grid", NO_REPORT))

    runs = training_runs(tracking_uri)
    assert sorted(int(run.data.params["tbptt.k"]) for run in runs) == [2, 4, 8]
    assert all(run.info.status == "FINISHED" for run in runs)
    # Each job ends by stating its objective: the final val/loss its run logged.
    stated = sorted(float(v) for v in re.findall(r"val/loss = ([0-9.]+) \| MLflow run", output))
    logged = sorted(run.data.metrics["val/loss"] for run in runs)
    assert stated == pytest.approx(logged, abs=1e-4)


def test_a_lagging_trial_is_pruned_in_optuna_and_in_mlflow(run_train, tmp_path, tracking_uri):
    # Trial 0 learns (lr near 0.025); trial 1 barely moves (lr near 1e-7), so the median
    # pruner, with one trial to compare against, stops it after its first epoch of three.
    sweep = ["-m", "sweep=k_lr", "trainer.max_epochs=3", NO_REPORT,
             "hydra.sweeper.pruner_options={n_startup_trials:1,n_warmup_steps:0}"]
    check(run_train(*sweep, "hydra.sweeper.n_trials=1", "optimizer.lr=interval(0.02,0.03)"))
    output = check(run_train(*sweep, "hydra.sweeper.n_trials=2",
                             "optimizer.lr=interval(1e-7,2e-7)"))
    assert "Continuing study 'k_lr'" in output
    assert "Trial 1 pruned" in output

    study = study_of(tmp_path, "k_lr")
    learner, laggard = study.trials
    assert learner.state.name == "COMPLETE"
    assert sorted(learner.intermediate_values) == [0, 1, 2]
    assert laggard.state.name == "PRUNED"
    assert sorted(laggard.intermediate_values) == [0]  # it ended early

    runs = {run.info.run_id: run for run in training_runs(tracking_uri)}
    pruned_run = runs[laggard.user_attrs["mlflow_run_id"]]
    assert pruned_run.info.status == "KILLED"
    assert pruned_run.data.tags["trial.state"] == "PRUNED"
    assert runs[learner.user_attrs["mlflow_run_id"]].data.tags["trial.state"] == "COMPLETE"

    results = results_of(tmp_path, "k_lr")
    assert results["trials"]["pruned"] == 1
    assert results["best_trial"] == 0
    assert results["best_value"] == pytest.approx(learner.value)


def test_an_interrupted_sweep_run_again_ends_with_exactly_n_trials(tmp_path, tracking_uri):
    command = [sys.executable, "-m", "src.train", *with_defaults(
        ["-m", "sweep=k_lr", "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner=none", NO_REPORT],
        [*TINY, "trainer.num_threads=1"])]
    env = subprocess_env(tracking_uri)
    journal = tmp_path / "multirun" / "k_lr" / "optuna.journal"

    # Ctrl-C once two trials have completed and a third has started.
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if journal.exists():
                tally = Tally.of(study_of(tmp_path, "k_lr").get_trials())
                if tally.complete >= 2 and tally.running:
                    break
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) != 0
    before = Tally.of(study_of(tmp_path, "k_lr").get_trials())
    done = before.finished
    assert done < 4, (tmp_path / "first.log").read_text()[-3000:]

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    output = check(result)
    assert f"{done} of n_trials=4 trials done, {4 - done} to run" in output

    trials = study_of(tmp_path, "k_lr").get_trials()
    after = Tally.of(trials)
    assert after.finished == 4 and after.running == 0
    # The trial cut off is FAIL, marked interrupted (by the sweep as it stopped, or by the
    # next run, which found its process gone), and its slot was run again.
    assert after.interrupted >= 1
    assert all("interrupted" in t.user_attrs for t in trials if t.state.name == "FAIL")

    # A finished study run again runs nothing, and says so.
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert "already has 4 of n_trials=4 trials: nothing to run" in check(result)
    assert len(study_of(tmp_path, "k_lr").get_trials()) == len(trials)


FAILING_SWEEP = """\
# @package _global_
defaults:
  - override /hydra/sweeper: tbptt_optuna
hydra:
  sweep:
    dir: multirun/failing
  sweeper:
    study_name: failing
    sampler: grid
    pruner: none
    n_trials: 3
    max_failure_rate: 0.5
    params:
      data.lag: choice(2, 3, 30)  # 30 is not below data.seq_len=24: the config check rejects it
"""


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(run_train, tmp_path):
    # A sweep file of the user's own, found through hydra.searchpath. (A diverging loss
    # fails a trial the same way: tests/test_faults.py.)
    (tmp_path / "extra" / "sweep").mkdir(parents=True)
    (tmp_path / "extra" / "sweep" / "failing.yaml").write_text(FAILING_SWEEP)
    output = check(run_train("-m", f"hydra.searchpath=[file://{tmp_path / 'extra'}]",
                             "sweep=failing", NO_REPORT))

    assert re.search(r"Trial \d failed: ConfigError: data.lag must be less than", output)
    trials = study_of(tmp_path, "failing").get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert failed.params["data.lag"] == 30
    assert "data.lag must be less than data.seq_len" in failed.user_attrs["error"]
    results = results_of(tmp_path, "failing")
    assert results["trials"]["failed"] == 1
    assert results["best_params"]["data.lag"] in (2, 3)
    # (Stopping once failures pass max_failure_rate: tests/test_sweeper_parsing.py.)


def test_joblib_runs_two_trials_at_once_each_on_its_share_of_cores(run_train, tmp_path,
                                                                   tracking_uri):
    output = check(run_train("-m", "sweep=k_lr", "hydra/launcher=joblib",
                             "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=2",
                             "trainer.num_threads=auto", NO_REPORT))
    assert "Joblib.Parallel(n_jobs=2" in output and "is launching 2 jobs" in output

    trials = study_of(tmp_path, "k_lr").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    # Each worker process reached its trial through the journal file and reported every epoch.
    assert all(sorted(t.intermediate_values) == [0, 1] for t in trials)

    # Two worker processes, neither of them the sweeper's.
    pids = {t.user_attrs["job_pid"] for t in trials}
    assert len(pids) == 2 and trials[0].user_attrs["sweeper_pid"] not in pids

    runs = training_runs(tracking_uri)
    assert len(runs) == 2
    cores = len(os.sched_getaffinity(0))
    assert {run.data.tags["torch.num_threads"] for run in runs} == {str(max(1, cores // 2))}


def test_two_objectives_give_a_pareto_front(run_train, tmp_path):
    check(run_train("-m", "sweep=k_speed", "hydra.sweeper.n_trials=3", NO_REPORT))

    results = results_of(tmp_path, "k_speed")
    assert results["metrics"] == ["val/loss", "perf/epoch_seconds"]
    front = results["pareto_front"]
    assert front
    complete = [t for t in study_of(tmp_path, "k_speed").get_trials()
                if t.state.name == "COMPLETE"]
    for entry in front:
        values = [entry["values"]["val/loss"], entry["values"]["perf/epoch_seconds"]]
        # No completed trial is at least as good in both and better in one.
        assert not any(
            all(o <= v for o, v in zip(t.values, values, strict=True)) and t.values != values
            for t in complete
        )
        assert f"tbptt.k={entry['params']['tbptt.k']}" in entry["overrides"]
