"""Bad input fails at once and starts nothing; a fault loses nothing that was already done.

Every test runs `python -m src.train` as a user does, against a real SQLite MLflow store in
`tmp_path` (and, for sweeps, the Optuna journal file in the sweep folder), then reads what the
command left behind.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import free_port, postgres  # noqa: F401 (the postgres fixture)

from tests.conftest import REPO, TINY, subprocess_env, with_defaults

SECRET = "s3cr3t-Pw"


def user_env(tracking_uri: str | None = None) -> dict[str, str]:
    # What a user's shell has: no HYDRA_FULL_ERROR, so Hydra's own errors come without a trace.
    env = subprocess_env(tracking_uri)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def assert_nothing_started(folder: Path) -> None:
    # No MLflow store was even opened, and no sweep folder (or Optuna journal) was made.
    assert not (folder / "mlflow.db").exists()
    assert not (folder / "multirun").exists()


def mlflow_runs(tracking_uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


# ---- bad input --------------------------------------------------------------------------

BAD_INPUT = [
    # (arguments, what the message must say); {tmp} is the test's folder.
    (["tbptt.k=abc"], "tbptt.k must be a positive integer, but got 'abc'"),
    (["tbptt=k1k2", "tbptt.k=8", "tbptt.k2=4"],
     "tbptt.k2 must be at least tbptt.k1 (it is the span the loss of k1 steps backpropagates "
     "through), but got k1=8 and k2=4"),
    (["optimizer.lr=-0.1"], "optimizer.lr must be a positive finite number, but got -0.1"),
    (["optimizer.lr=fast"], "optimizer.lr must be a positive finite number, but got 'fast'"),
    (["model.hidden_size=0"], "model.hidden_size must be a positive integer, but got 0"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be a positive integer, but got 0"),
    (["data=text", "data.path={tmp}"], "data.path must be a file, but '{tmp}' is a folder"),
    (["data=text", "data.path={tmp}/empty.txt"], "is empty"),
    (["data=text", "data.path={tmp}/blob.bin"], "looks binary"),
    (["ckpt_path={tmp}/nope.ckpt"], "ckpt_path must be an existing checkpoint file"),
    (["logger.run_name=${oops}"], "logger.run_name cannot be read: Interpolation key 'oops'"),
    # A grid is checked job by job before the first one starts.
    (["-m", "tbptt.k=5,0,20"], "job #1 (tbptt.k=0"),
    (["-m", "sweep=grid_k", "optimizer.lr=1e-3,-1"],
     "optimizer.lr must be a positive finite number, but got -1"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_fails_at_once_naming_the_key_and_starts_nothing(run_train, tmp_path, args,
                                                                   message) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\xff" * 100)
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]

    started = time.monotonic()
    result = run_train(*args, timeout=60, env=user_env(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert time.monotonic() - started < 30  # no torch, no Lightning on this path

    assert result.returncode == 2, result.stderr
    assert message.replace("{tmp}", str(tmp_path)) in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_started(tmp_path)


@pytest.mark.parametrize("sweep", sorted(path.stem for path in (REPO / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_passes_the_job_checks(sweep) -> None:
    from hydra import compose, initialize_config_dir

    from src.job_checks import check_jobs, check_optuna_sweep

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = compose("train", overrides=[f"sweep={sweep}"], return_hydra_config=True)
        check_optuna_sweep(config)
        assert check_jobs(config, "train") >= 1


def test_a_large_grid_is_checked_one_value_at_a_time_numbered_as_hydra_numbers_jobs(
    monkeypatch,
) -> None:
    import itertools

    from src import job_checks

    choices = {"a": ["a=1", "a=2"], "b": ["b=1", "b=2", "b=3"], "c": ["c=0"]}
    every = list(enumerate(map(list, itertools.product(*choices.values()))))
    assert job_checks.jobs_to_check(choices) == every

    monkeypatch.setattr(job_checks, "MAX_CHECKED_JOBS", 3)
    some = job_checks.jobs_to_check(choices)
    assert all(job in every for job in some)
    # Every value of every key is in some checked job.
    for options in choices.values():
        assert {option for _, job in some for option in job} >= set(options)
    assert len(some) == 4


UNKNOWN_OPTIONS = [
    (["model=gru"], "model/gru", ["lstm"]),
    (["optimizer=adamm"], "optimizer/adamm", ["adam", "adamw", "sgd"]),
    (["sweep=nope"], "sweep/nope", ["grid_k", "k_lr"]),
    (["-m", "sweep=nope"], "sweep/nope", ["grid_k", "k_lr"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "missing", "available"), UNKNOWN_OPTIONS)
def test_an_unknown_option_lists_the_available_ones(run_train, tmp_path, args, missing,
                                                    available) -> None:
    result = run_train(*args, timeout=60, env=user_env(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert result.returncode != 0
    assert f"Could not find '{missing}'" in result.stderr
    listed = result.stderr.split("Available options", 1)[1]
    for name in available:
        assert re.search(rf"^\s+{name}$", listed, re.MULTILINE), result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_started(tmp_path)


BAD_SPACE = """\
# @package _global_
defaults:
  - override /hydra/sweeper: tbptt_optuna
hydra:
  sweep:
    dir: multirun/${{hydra.sweeper.study_name}}
  sweeper:
    study_name: bad
    n_trials: 2
    params:
      {param}
"""

BAD_SWEEPS = [
    # (a params entry of a sweep file, or None; command-line arguments; the message's words)
    ("tbptt.k: choice()", [], ["hydra.sweeper.params.tbptt.k", "empty choice"]),
    ("optimizer.lr: interval(0.1, 0.0001)", [],
     ["hydra.sweeper.params.optimizer.lr", "low < high", "interval(0.0001, 0.1)"]),
    (None, ["optimizer.lr=interval(1e-1,1e-4)"],
     ["optimizer.lr=interval(1e-1,1e-4)", "low < high"]),
    (None, ["hydra.sweeper.sampler=tpee"],
     ["hydra.sweeper.sampler must be one of tpe, random", "but got 'tpee'"]),
    (None, ["hydra.sweeper.pruner=medain"],
     ["hydra.sweeper.pruner must be one of median, percentile", "but got 'medain'"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("param", "args", "words"), BAD_SWEEPS)
def test_a_search_space_or_sweeper_setting_that_cannot_work_starts_nothing(
    run_train, tmp_path, param, args, words
) -> None:
    if param is None:
        sweep = ["-m", "sweep=k_lr"]
    else:
        (tmp_path / "extra" / "sweep").mkdir(parents=True)
        (tmp_path / "extra" / "sweep" / "bad.yaml").write_text(BAD_SPACE.format(param=param))
        sweep = ["-m", f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "sweep=bad"]

    result = run_train(*sweep, *args, timeout=60,
                       env=user_env(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    # No MLflow parent run, no study, no trial.
    assert_nothing_started(tmp_path)


# ---- an unreachable tracking store ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["server", "database", "database from the environment"])
def test_an_unreachable_tracking_store_is_reported_in_seconds_with_the_password_masked(
    run_train, tmp_path, where
) -> None:
    port = free_port()  # nothing listens there
    if where == "server":
        uri, shown = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    else:
        uri = f"postgresql://user:{SECRET}@127.0.0.1:{port}/db"
        shown = f"postgresql://user:***@127.0.0.1:{port}/db"
    if where == "database from the environment":
        args, env = [], user_env(uri)
    else:
        args, env = [f"logger.tracking_uri={uri}"], user_env()

    started = time.monotonic()
    result = run_train(*args, timeout=120, env=env)
    elapsed = time.monotonic() - started

    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert f"error: cannot reach the MLflow tracking store at {shown}" in result.stderr
    assert SECRET not in output
    assert "Traceback" not in output
    # Reported before training: no checkpoint was written.
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


@pytest.mark.server
def test_a_live_database_is_reached_and_a_wrong_password_fails_fast(postgres) -> None:  # noqa: F811
    from src.tracking import TrackingError, client_for

    url = postgres.create_database("faults")
    client_for(url).search_experiments()  # the probe lets a working database through

    wrong = url.replace(f":{postgres.password}@", f":{SECRET}@")
    started = time.monotonic()
    with pytest.raises(TrackingError) as error:
        client_for(wrong)
    assert time.monotonic() - started < 15
    assert f"{postgres.user}:***@127.0.0.1:{postgres.port}/faults" in str(error.value)
    assert SECRET not in str(error.value)


# ---- a diverging run ----------------------------------------------------------------------

# Adam's step is about lr whatever the gradient: at 1e20 the regression output overflows to inf
# within the first batch, with clipping on or off.
DIVERGING = ["data=average", "optimizer.lr=1e20"]


@pytest.mark.slow
def test_a_diverging_run_stops_at_once_naming_epoch_batch_and_window(run_train,
                                                                     tracking_uri) -> None:
    result = run_train(*DIVERGING, "trainer.max_epochs=3", env=user_env(tracking_uri))

    assert result.returncode == 1
    assert re.search(r"error: the training loss diverged to (inf|nan) in epoch 0, batch \d+, "
                     r"window \d+; lower optimizer.lr", result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    from mlflow import MlflowClient

    (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "FAILED"
    # It stopped inside the first epoch: not one epoch's metrics were logged.
    assert MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "val/loss") == []


DIVERGING_SWEEP = """\
# @package _global_
defaults:
  - override /hydra/sweeper: tbptt_optuna
hydra:
  sweep:
    dir: multirun/${hydra.sweeper.study_name}
  sweeper:
    study_name: diverging
    sampler: grid
    pruner: none
    n_trials: 2
    max_failure_rate: 0.5
    params:
      optimizer.lr: choice(0.001, 1e20)
"""


@pytest.mark.slow
def test_a_diverging_trial_fails_and_the_sweep_goes_on(run_train, tmp_path, tracking_uri) -> None:
    from hydra_plugins.tbptt_optuna_sweeper.study import load_study

    (tmp_path / "extra" / "sweep").mkdir(parents=True)
    (tmp_path / "extra" / "sweep" / "diverging.yaml").write_text(DIVERGING_SWEEP)
    result = run_train("-m", f"hydra.searchpath=[file://{tmp_path / 'extra'}]",
                       "sweep=diverging", "data=average")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    study = load_study(str(tmp_path / "multirun" / "diverging" / "optuna.journal"), "diverging")
    trials = {trial.params["optimizer.lr"]: trial for trial in study.get_trials()}
    assert trials[0.001].state.name == "COMPLETE"
    assert trials[1e20].state.name == "FAIL"
    assert "diverged" in trials[1e20].user_attrs["error"]

    runs = {run.data.params.get("optimizer.lr"): run for run in mlflow_runs(tracking_uri)
            if "optimizer.lr" in run.data.params}
    assert runs["0.001"].info.status == "FINISHED"
    assert runs["1e+20"].info.status == "FAILED"


# ---- an interrupted run, resumed in the same MLflow run ------------------------------------

# Epochs of about two seconds on two cores (more on a busy machine), so that a signal sent
# when the first checkpoint appears lands mid-training even if this process is slow to see it.
LONGER = ["data.n_train=4096", "data.n_val=32", "data.seq_len=32", "data.batch_size=16",
          "trainer.max_epochs=3"]


def start_training(args: list[str], folder: Path, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "src.train",
               *with_defaults(args, [*TINY, "trainer.num_threads=1"])]
    log = open(folder / "first.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=log)


def wait_for_checkpoint(process: subprocess.Popen, folder: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = list(folder.glob("outputs/*/*/checkpoints/last.ckpt"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint before the run ended:\n"
                         f"{(folder / 'first.log').read_text()[-3000:]}")


def resume_command(log: str) -> list[str]:
    """The command the interrupted run printed, as argv for this Python."""
    line = log.split("to train on in the same run:\n", 1)[1].splitlines()[0]
    words = shlex.split(line)
    assert words[:3] == ["python", "-m", "src.train"]
    return [sys.executable, "-m", "src.train", *words[3:]]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "try_other_config"),
                         [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_an_interrupted_run_ends_killed_and_resumes_in_the_same_run(
    tmp_path, tracking_uri, signum, try_other_config
) -> None:
    from mlflow import MlflowClient

    env = user_env(tracking_uri)
    process = start_training(LONGER, tmp_path, env)
    checkpoint = wait_for_checkpoint(process, tmp_path)
    process.send_signal(signum)
    returncode = process.wait(timeout=120)
    log = (tmp_path / "first.log").read_text()
    assert returncode == 128 + signum, log[-3000:]

    # KILLED, with the last completed epoch on disk and its metrics in the run.
    (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "KILLED", log[-3000:]
    assert checkpoint.exists()
    client = MlflowClient(tracking_uri)
    before = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert 1 <= len(before) < 3

    # The printed command is the original one plus ckpt_path.
    command = resume_command(log)
    assert command[-1] == f"ckpt_path={checkpoint.resolve()}"

    if try_other_config:
        # A different config would mix two trainings in one run: refused, naming the key.
        other = subprocess.run([*command, "tbptt.k=7"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300, check=False)
        assert other.returncode == 2
        assert f"resumes MLflow run {run.info.run_id}, which was trained with tbptt.k=10 " \
               "(now 7)" in other.stderr

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    # Still one run, now FINISHED, whose history goes on from where it stopped.
    (resumed,) = mlflow_runs(tracking_uri)
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from"] == str(checkpoint.resolve())
    after = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss")]
    steps = [step for step, _ in after]
    assert len(after) == 3  # one per epoch: none repeated, none missing
    assert steps == sorted(set(steps))
    assert after[: len(before)] == before


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused(run_train, tmp_path) -> None:
    import torch

    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, tmp_path / "evil.ckpt")

    result = run_train(f"ckpt_path={tmp_path / 'evil.ckpt'}", env=user_env(
        f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert result.returncode == 2
    assert "ckpt_path must be a checkpoint that loads with weights_only=True" in result.stderr
    assert not marker.exists()
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


class RunsCode:
    """Unpickling this creates a file: what an unsafe checkpoint load would let happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---- secrets ----------------------------------------------------------------------------


@pytest.mark.slow  # a fresh MLflow store takes seconds to create
def test_secrets_in_the_config_are_masked_in_params_tags_and_artifacts(tmp_path) -> None:
    from mlflow import MlflowClient
    from omegaconf import open_dict

    from src.tracking import create_run
    from tests.conftest import compose

    db_uri = f"postgresql://user:{SECRET}@db.example:5432/optuna"
    overrides = [f"+extra.storage={db_uri}", f"+extra.api_token={SECRET}",
                 f"+logger.tags.db={db_uri}"]
    cfg = compose([*TINY, *overrides])
    with open_dict(cfg):
        del cfg["hydra"]  # a job's config has no hydra node
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = create_run(client, cfg, run_name=None, overrides=overrides)

    run = client.get_run(run_id)
    assert run.data.params["extra.storage"] == "postgresql://user:***@db.example:5432/optuna"
    assert run.data.params["extra.api_token"] == "***"
    assert run.data.tags["db"] == "postgresql://user:***@db.example:5432/optuna"
    recorded = [str(run.data.params), str(run.data.tags)]
    for artifact in ["config/config.yaml", "config/overrides.txt"]:
        local = client.download_artifacts(run_id, artifact, str(tmp_path))
        recorded.append(Path(local).read_text())
    assert all(SECRET not in text for text in recorded)
    assert "user:***@db.example" in recorded[-1]


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    return [REPO / name for name in listed if (REPO / name).is_file()]


# A password written into a URI or a setting. Placeholders and references to the environment
# (`${POSTGRES_PASSWORD}`, `$PW`) are what belongs in a repository.
URI_PASSWORD = re.compile(r"://[^\s:/@'\"]*:(?P<password>\$\{[^}]*\}|[^\s/@'\"]+)@")
SETTING_PASSWORD = re.compile(
    r"(?im)^[ \t]*[\w.]*(password|secret|token)\w*[ \t]*[:=][ \t]*(?P<password>\S*)"
)
PLACEHOLDERS = {"", "***", "...", "password", "pass", "pw", "secret", "<password>"}


def test_no_password_is_written_in_the_repository() -> None:
    found = []
    for path in tracked_files():
        if path.is_relative_to(REPO / "tests") or path.suffix in {".png", ".ckpt"}:
            continue
        text = path.read_text(errors="ignore")
        patterns = [URI_PASSWORD] + ([] if path.suffix == ".py" else [SETTING_PASSWORD])
        for pattern in patterns:
            for match in pattern.finditer(text):
                password = match.group("password").strip("'\"")
                if password.lower() not in PLACEHOLDERS and not password.startswith("$"):
                    found.append(f"{path.relative_to(REPO)}: {match.group(0).strip()}")
    assert not found, "passwords in tracked files (read them from the environment):\n" + \
        "\n".join(found)


def test_yaml_is_only_read_with_a_safe_loader() -> None:
    unsafe = re.compile(
        r"yaml\.(load|unsafe_load|full_load)\(|Loader=yaml\.(Full|Unsafe)?Loader\b"
    )
    found = [f"{path.relative_to(REPO)}: {match.group(0)}"
             for path in tracked_files() if path.suffix == ".py"
             for match in unsafe.finditer(path.read_text())]
    assert not found, found


# ---- a sweep killed outright --------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_resumes_keeping_every_completed_trial(tmp_path,
                                                                           tracking_uri) -> None:
    from mlflow import MlflowClient

    from hydra_plugins.tbptt_optuna_sweeper._sweep import Tally
    from hydra_plugins.tbptt_optuna_sweeper.study import load_study

    # Trials of a few seconds each, so that the kill lands inside one.
    args = ["-m", "sweep=k_lr", "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=none",
            "data.n_train=512", "trainer.max_epochs=3"]
    command = [sys.executable, "-m", "src.train",
               *with_defaults(args, [*TINY, "trainer.num_threads=1"])]
    env = user_env(tracking_uri)
    journal = tmp_path / "multirun" / "k_lr" / "optuna.journal"

    def trials():
        return load_study(str(journal), "k_lr").get_trials()

    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            # Once a trial has completed and the next one has its MLflow run: mid-training.
            if journal.exists():
                now = trials()
                if Tally.of(now).complete >= 1 and any(
                    t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in now
                ):
                    break
            time.sleep(0.2)
        process.kill()  # SIGKILL: no handler runs, nothing is cleaned up
        process.wait(timeout=60)
    done = {t.number: t.value for t in trials() if t.state.name == "COMPLETE"}
    (cut,) = [t for t in trials() if t.state.name == "RUNNING"]
    assert done, (tmp_path / "first.log").read_text()[-3000:]

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    after = trials()
    # Every trial completed before the kill is kept as it was; the sweep ran on to n_trials.
    assert {t.number: t.value for t in after if t.number in done} == done
    assert sum(t.state.name == "COMPLETE" for t in after) == 3
    (killed,) = [t for t in after if t.number == cut.number]
    assert killed.state.name == "FAIL"

    # Their MLflow runs are intact; the run the kill cut off no longer shows RUNNING, and
    # the sweep's parent run is closed again.
    client = MlflowClient(tracking_uri)
    for trial in after:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        expected = "KILLED" if trial.number == cut.number else "FINISHED"
        assert run.info.status == expected, (trial.number, trial.state.name)
    parent_id = run.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_password_in_a_sweep_override_is_masked_in_what_hydra_logs(run_train,
                                                                     tracking_uri) -> None:
    storage = f"postgresql://user:{SECRET}@db.example:5432/optuna"
    result = run_train("-m", f"+extra.storage={storage}", f"+extra.api_token={SECRET}",
                       "tbptt.k=4", "trainer.max_epochs=1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]

    # Hydra logs each job's overrides as it launches it (with its colons escaped).
    launched = r"#0 : \+extra.storage=postgresql\\?://user\\?:\*\*\*@db.example\\?:5432/optuna "
    assert re.search(launched + r"\+extra.api_token=\*\*\*", output), output[-3000:]
    assert SECRET not in output
    (run,) = [run for run in mlflow_runs(tracking_uri) if "extra.storage" in run.data.params]
    assert SECRET not in str(run.data.params)
