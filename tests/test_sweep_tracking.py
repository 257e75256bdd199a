"""A sweep as one MLflow parent run, and its report: ids, parent runs, reports from a study."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, subprocess_env, with_defaults
from omegaconf import OmegaConf

from src import report, sweep_tracking

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hydra_node(sweep_dir: str = "multirun/a", **sweeper) -> OmegaConf:
    return OmegaConf.create({
        "sweep": {"dir": sweep_dir},
        "sweeper": sweeper,
        "overrides": {"task": []},
        "runtime": {"choices": {}},
    })


# ---- ids and descriptions (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        # Workers of one study share the parent, whatever their sweep folder.
        (("multirun/a", "k_lr", "postgresql://db/x"), ("multirun/b", "k_lr", "postgresql://db/x"),
         True),
        # The same study name in another storage is another study.
        (("multirun/a", "k_lr", "postgresql://db/x"), ("multirun/a", "k_lr", "postgresql://db/y"),
         False),
        # A relative journal file names the same place as its absolute path.
        (("multirun/a", "s", "j/optuna.journal"), ("multirun/b", "s", "/work/j/optuna.journal"),
         True),
        # A grid is its sweep folder.
        (("multirun/a", None, None), ("multirun/a", None, None), True),
        (("multirun/a", None, None), ("multirun/b", None, None), False),
    ],
)
def test_sweep_id_is_shared_by_exactly_the_processes_of_one_sweep(first, second, same) -> None:
    ids = []
    for sweep_dir, study_name, storage in (first, second):
        sweeper = {"study_name": study_name, "storage": storage} if study_name else {}
        ids.append(sweep_tracking.sweep_id(hydra_node(sweep_dir, **sweeper), cwd="/work"))
    assert (ids[0] == ids[1]) is same


def test_a_grid_is_named_after_its_sweep_overrides() -> None:
    cfg = OmegaConf.create({"optimized_metric": "val/acc", "hydra": hydra_node()})
    cfg.hydra.overrides.task = ["tbptt.k=2,4,8", "data.n_train=32"]

    sweep = sweep_tracking.describe_sweep(cfg, cwd="/work")

    assert sweep.name == "tbptt.k=2,4,8"
    assert sweep.kind == "grid" and not sweep.resumable
    assert sweep.swept_keys == ("tbptt.k",)
    # Accuracy is maximised; nothing said so, the metric's name does.
    assert sweep.tags["sweep.objective"] == "val/acc"
    assert sweep.tags["sweep.direction"] == "maximize"
    assert sweep.tags["sweep.role"] == "parent"
    assert sweep.tags["sweep.dir"] == "/work/multirun/a"
    assert "optuna.study_name" not in sweep.tags


def test_an_optuna_sweep_is_named_after_its_study_and_hides_the_password() -> None:
    cfg = OmegaConf.create({
        "optimized_metric": ["val/loss", "perf/timesteps_per_second"],
        "hydra": hydra_node(
            study_name="k_speed",
            storage="postgresql://user:s3cret@db:5432/optuna",
            direction=["minimize", "maximize"],
            params={"tbptt.k": "choice(2,4)", "optimizer.lr": "interval(1e-4,1e-1)"},
        ),
    })

    sweep = sweep_tracking.describe_sweep(cfg, cwd="/work")

    assert sweep.name == "k_speed"
    assert sweep.kind == "optuna" and sweep.resumable
    assert sweep.swept_keys == ("tbptt.k", "optimizer.lr")
    assert sweep.tags["optuna.study_name"] == "k_speed"
    assert sweep.tags["optuna.storage"] == "postgresql://user:***@db:5432/optuna"
    assert "s3cret" not in json.dumps(sweep.tags)
    assert sweep.tags["sweep.direction"] == "minimize,maximize"


def test_a_child_run_is_named_after_its_job_and_the_swept_values(monkeypatch) -> None:
    monkeypatch.setenv(sweep_tracking.SWEEP_KEYS_ENV, "tbptt.k,optimizer.lr")
    hydra_cfg = OmegaConf.create({
        "job": {"num": 3},
        "overrides": {"task": ["tbptt.k=8", "data.n_train=32", "optimizer.lr=0.01"]},
    })

    assert sweep_tracking.child_run_name(hydra_cfg) == "#3 tbptt.k=8, optimizer.lr=0.01"


@pytest.mark.parametrize(
    ("points", "directions", "front"),
    [
        ([[1, 5], [2, 4], [3, 3], [2, 5]], ["minimize", "minimize"], [0, 1, 2]),
        ([[1, 5], [2, 4], [3, 3], [2, 5]], ["maximize", "maximize"], [2, 3]),
        # Loss down, speed up: (1, 10) beats (2, 5) in both.
        ([[1, 10], [2, 5], [0.5, 1]], ["minimize", "maximize"], [0, 2]),
        # Equal points do not dominate each other.
        ([[1, 1], [1, 1]], ["minimize", "minimize"], [0, 1]),
    ],
)
def test_pareto_front(points, directions, front) -> None:
    assert report.pareto_front(points, directions) == front


@pytest.mark.parametrize(
    ("metric", "direction"),
    [("val/loss", "minimize"), ("val/acc", "maximize"), ("val/bpc", "minimize"),
     ("perf/timesteps_per_second", "maximize"), ("val/rmse", "minimize")],
)
def test_direction_follows_the_metric(metric, direction) -> None:
    assert report.infer_direction(metric) == direction


def test_markdown_table_escapes_pipes_and_right_aligns_numbers() -> None:
    table = report.markdown_table(["k", "name"], [[2, "a|b"], [4, None]])

    assert table.splitlines() == [
        "| k | name |",
        "|---:|---|",
        "| 2 | a\\|b |",
        "| 4 |  |",
    ]


def test_importing_the_callback_and_the_report_stays_light() -> None:
    # Hydra imports the callback at every start, --help included.
    code = (
        "import sys, src.sweep_tracking, src.report, src.plots; "
        "heavy = [m for m in ('mlflow', 'optuna', 'matplotlib', 'torch', 'pandas') "
        "if m in sys.modules]; print(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ---- parent runs on a real store ---------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite MLflow store shared by this module's tests (creating one takes seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    return uri, MlflowClient(uri)


@pytest.mark.slow
def test_find_or_create_parent_creates_once_and_reopens_only_a_study(store) -> None:
    _, client = store
    experiment_id = client.create_experiment("parents")
    study = sweep_tracking.Sweep("k_lr-1", "k_lr", "optuna", ("tbptt.k",),
                                 {"sweep.id": "k_lr-1", "sweep.role": "parent"})
    grid = sweep_tracking.Sweep("grid-1", "grid", "grid", ("tbptt.k",),
                                {"sweep.id": "grid-1", "sweep.role": "parent"})

    first, created = sweep_tracking.find_or_create_parent(client, experiment_id, study)
    again, created_again = sweep_tracking.find_or_create_parent(client, experiment_id, study)
    assert created and not created_again and again == first

    # A later command that continues the study continues its parent.
    client.set_terminated(first, "FINISHED")
    resumed, created = sweep_tracking.find_or_create_parent(client, experiment_id, study)
    assert resumed == first and not created
    assert client.get_run(first).info.status == "RUNNING"

    # A grid that ended is not continued: the same folder swept again is a new sweep.
    grid_parent, _ = sweep_tracking.find_or_create_parent(client, experiment_id, grid)
    client.set_terminated(grid_parent, "FINISHED")
    new_parent, created = sweep_tracking.find_or_create_parent(client, experiment_id, grid)
    assert created and new_parent != grid_parent


# ---- a report from an Optuna study -------------------------------------------------------


def make_study_sweep(client, tmp_path: Path, objectives: list[str], directions: list[str]):
    """An Optuna study in a journal file, and an MLflow parent with a child run per trial,
    recorded the way a sweep records them: 6 complete trials, 1 pruned, 1 failed."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(
        study_name="k_lr",
        storage=JournalStorage(JournalFileBackend(journal)),
        directions=directions,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    experiment_id = client.create_experiment(f"study-{len(objectives)}")
    parent = client.create_run(experiment_id, run_name="k_lr", tags={
        "sweep.id": "k_lr-test", "sweep.role": "parent", "sweep.name": "k_lr",
        "sweep.params": "tbptt.k,optimizer.lr", "sweep.objective": ",".join(objectives),
        "sweep.direction": ",".join(directions), "optuna.study_name": "k_lr",
        "optuna.storage": journal,
    }).info.run_id
    space = {
        "tbptt.k": optuna.distributions.IntDistribution(2, 32, log=True),
        "optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
    }
    for number in range(8):
        trial = study.ask(space)
        k, lr = trial.params["tbptt.k"], trial.params["optimizer.lr"]
        run_id = client.create_run(experiment_id, run_name=f"#{number}", tags={
            "mlflow.parentRunId": parent, "trial.number": str(number),
        }).info.run_id
        client.log_param(run_id, "tbptt.k", k)
        client.log_param(run_id, "optimizer.lr", lr)
        epochs = 2 if number == 6 else 4
        # A loss that falls with k and has an optimum in lr: something for fANOVA to find.
        final = 1.0 / k + abs(lr - 0.01) * 10
        for epoch in range(epochs):
            loss = final + 0.5 / (epoch + 1)
            client.log_metric(run_id, objectives[0], loss, step=epoch)
            client.log_metric(run_id, "epoch", epoch, step=epoch)
            if len(objectives) == 1:  # Optuna prunes single-objective studies only
                trial.report(loss, epoch)
        client.log_metric(run_id, "perf/timesteps_per_second", 1000.0 * k)
        if len(objectives) > 1:
            client.log_metric(run_id, objectives[1], 1000.0 * k)
        values = [loss] + ([1000.0 * k] if len(objectives) > 1 else [])
        if number == 6:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            client.set_terminated(run_id, "KILLED")
        elif number == 7:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            client.set_terminated(run_id, "FAILED")
        else:
            study.tell(trial, values if len(values) > 1 else values[0])
            client.set_terminated(run_id, "FINISHED")
    return parent, journal, study


@pytest.mark.slow
@pytest.mark.parametrize("n_objectives", [1, 2])
def test_report_of_an_optuna_study(store, tmp_path, n_objectives) -> None:
    _, client = store
    objectives = ["val/loss", "perf/timesteps_per_second"][:n_objectives]
    directions = ["minimize", "maximize"][:n_objectives]
    parent, journal, study = make_study_sweep(client, tmp_path, objectives, directions)

    summary = report.build_report(
        client, parent, tmp_path / "report", study=report.load_study("k_lr", journal)
    )

    # The study knows which trial was pruned; MLflow only saw a KILLED run.
    assert summary.counts == {"COMPLETE": 6, "PRUNED": 1, "FAIL": 1, "RUNNING": 0}
    expected_best = min(
        trial.values[0] for trial in study.trials if trial.state.name == "COMPLETE"
    )
    assert summary.best_value == pytest.approx(expected_best)
    plots = ["objective_vs_k.png", "val_curves.png", "history.png", "importances.png"]
    if n_objectives == 2:
        plots.append("pareto.png")
    for name in plots:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert (n_objectives == 2) == (tmp_path / "report" / "pareto.png").exists()

    with open(tmp_path / "report" / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["state"] for row in rows] == ["COMPLETE"] * 6 + ["PRUNED", "FAIL"]
    assert rows[6]["epochs"] == "2"
    assert {"tbptt.k", "optimizer.lr", "val/loss", "wall_s", "timesteps_per_s"} <= set(rows[0])
    assert "| trial | tbptt.k | optimizer.lr |" in (tmp_path / "report" / "trials.md").read_text()

    # Uploaded: the files, the counts as metrics, and each trial's final state as a tag.
    artifacts = {item.path for item in client.list_artifacts(parent, "report")}
    assert {f"report/{name}" for name in [*plots, "README.md", "trials.csv"]} <= artifacts
    metrics = client.get_run(parent).data.metrics
    assert metrics["sweep/trials_pruned"] == 1 and metrics["sweep/trials_complete"] == 6
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    states = {run.data.tags["trial.number"]: run.data.tags["trial.state"] for run in children}
    assert states["6"] == "PRUNED" and states["7"] == "FAIL" and states["0"] == "COMPLETE"

    # Read back from MLflow alone (no study), the report now tells the same story.
    again = report.build_report(client, parent, tmp_path / "again", upload=False)
    assert again.counts == summary.counts and again.best_value == summary.best_value


@pytest.mark.slow
def test_importances_are_skipped_with_a_note_when_nothing_varies(store, tmp_path) -> None:
    _, client = store
    experiment_id = client.create_experiment("one-trial")
    parent = client.create_run(experiment_id, tags={"sweep.role": "parent"}).info.run_id
    child = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    client.log_param(child, "tbptt.k", 4)
    client.log_metric(child, "val/loss", 0.5)
    client.set_terminated(child)

    summary = report.build_report(client, parent, tmp_path / "report", upload=False)

    assert summary.counts["COMPLETE"] == 1
    assert not (tmp_path / "report" / "importances.png").exists()
    assert "need two complete trials" in (tmp_path / "report" / "README.md").read_text()


# ---- sweeps from the command line --------------------------------------------------------


def sweep_command(*args: str) -> list[str]:
    defaults = [*TINY, "trainer.num_threads=1"]
    return [sys.executable, "-m", "src.train", "-m", *with_defaults(list(args), defaults)]


def parent_and_children(client, experiment: str = "tbptt-lab"):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([experiment_id], "tags.`sweep.role` = 'parent'")
    assert len(parents) == 1, [run.info.run_name for run in parents]
    parent = parents[0]
    children = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return parent, children


@pytest.mark.slow
def test_a_failed_job_is_a_failed_child_and_the_sweep_ends_failed(tmp_path, tracking_uri) -> None:
    from mlflow import MlflowClient

    # The second job trains, then fails: it names an objective that no run logs.
    result = subprocess.run(
        sweep_command("optimized_metric=val/loss,val/missing"), cwd=tmp_path,
        env=subprocess_env(tracking_uri), capture_output=True, text=True, timeout=300,
        check=False,
    )

    assert result.returncode != 0
    parent, children = parent_and_children(MlflowClient(tracking_uri))
    assert parent.info.status == "FAILED"
    by_metric = {run.data.params["optimized_metric"]: run for run in children}
    assert by_metric["val/loss"].info.status == "FINISHED"
    failed = by_metric["val/missing"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["trial.state"] == "FAIL"
    assert "val/missing" in failed.data.tags["trial.error"]
    # The report of what did run is on the parent all the same.
    (report_dir,) = tmp_path.glob("multirun/*/*/report")
    with open(report_dir / "trials.csv") as handle:
        states = sorted(row["state"] for row in csv.DictReader(handle))
    assert states == ["COMPLETE", "FAIL"]


@pytest.mark.slow
def test_a_job_that_failed_before_its_run_existed_still_shows_as_a_child(
    store, monkeypatch
) -> None:
    from conftest import compose

    uri, client = store
    config = compose(["tbptt.k=4", f"logger.tracking_uri={uri}", "logger.experiment_name=early"])
    experiment_id = client.create_experiment("early")
    parent = client.create_run(experiment_id, tags={"sweep.role": "parent"}).info.run_id
    monkeypatch.setenv(sweep_tracking.PARENT_RUN_ENV, parent)
    monkeypatch.setenv(sweep_tracking.SWEEP_ID_ENV, "sweep-early")
    monkeypatch.setenv(sweep_tracking.WORKER_ENV, "host:1")
    OmegaConf.update(config, "hydra.job.num", 5, force_add=True)

    sweep_tracking.record_failed_job(config, config.hydra, OSError("disk full"))

    (child,) = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert child.info.status == "FAILED"
    assert child.data.tags["trial.error"] == "OSError: disk full"
    assert child.data.tags["sweep.job"] == "5"
    # Its config is recorded like any run's, so the report's table has its k.
    assert child.data.params["tbptt.k"] == "4"


@pytest.mark.slow
def test_an_interrupted_sweep_ends_its_parent_killed(tmp_path, tracking_uri) -> None:
    from mlflow import MlflowClient

    # SIGTERM, what `kill` and schedulers send; Ctrl-C takes the same way out (Lightning
    # turns both into SystemExit during a fit).
    signum = signal.SIGTERM

    log_path = tmp_path / "sweep.log"
    # Output to a file: a pipe that nobody reads would fill up and block the sweep.
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            sweep_command("tbptt.k=2,4", "trainer.max_epochs=100000"),
            cwd=tmp_path, env=subprocess_env(tracking_uri), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            # Interrupt once the first trial has trained an epoch (and saved its checkpoint);
            # reading the store meanwhile could race the sweep creating its tables.
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and process.poll() is None:
                if list(tmp_path.glob("multirun/*/*/0/checkpoints/last.ckpt")):
                    break
                time.sleep(0.5)
            assert process.poll() is None, log_path.read_text()[-3000:]
            os.kill(process.pid, signum)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()

    parent, children = parent_and_children(MlflowClient(tracking_uri))
    assert parent.info.status == "KILLED"
    assert [run.info.status for run in children] == ["KILLED"]


@pytest.mark.slow
def test_a_single_run_stays_top_level(run_train, tracking_uri) -> None:
    from mlflow import MlflowClient

    # Even with a sweep's variable left over in the environment.
    env = subprocess_env(tracking_uri)
    env[sweep_tracking.PARENT_RUN_ENV] = "0" * 32

    result = run_train(env=env)

    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tbptt-lab").experiment_id])
    assert "mlflow.parentRunId" not in run.data.tags
    assert "sweep.role" not in run.data.tags


def test_a_password_on_the_command_line_stays_out_of_the_parents_tags_and_names() -> None:
    cfg = OmegaConf.create({"optimized_metric": "val/loss", "hydra": hydra_node()})
    cfg.hydra.overrides.task = [
        "logger.tracking_uri=postgresql://user:s3cret@db/mlflow", "tbptt.k=2,4",
    ]

    sweep = sweep_tracking.describe_sweep(cfg, cwd="/work")

    assert "s3cret" not in json.dumps(sweep.tags) + " ".join(sweep.overrides)
    assert "logger.tracking_uri=postgresql://user:***@db/mlflow" in sweep.overrides
