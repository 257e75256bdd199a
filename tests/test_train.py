"""`python -m src.train` end to end, as a user runs it, against a real SQLite MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def _only_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tbptt-lab")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_one_run_is_logged_to_mlflow(run_train, tracking_uri: str, tmp_path) -> None:
    result = run_train("tbptt.k=5", "optimizer.lr=0.01")
    assert result.returncode == 0, result.stderr

    client, run = _only_run(tracking_uri)
    assert run.info.status == "FINISHED"

    # The resolved config is flattened into params, so k and lr are columns in the UI.
    assert run.data.params["tbptt.k"] == "5"
    assert float(run.data.params["optimizer.lr"]) == 0.01
    assert run.data.params["data.name"] == "echo"
    assert run.data.tags["dataset"] == "echo"
    assert run.data.tags["tbptt.mode"] == "fixed"

    # Metrics with their steps: one value per epoch.
    for name in ["train/loss", "val/loss", "val/acc", "perf/timesteps_per_second",
                 "perf/wall_seconds"]:
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == 2, name
    assert 0.0 <= run.data.metrics["val/acc"] <= 1.0

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert artifacts == {"config/config.yaml", "config/overrides.txt"}
    overrides = client.download_artifacts(run.info.run_id, "config/overrides.txt", str(tmp_path))
    assert "tbptt.k=5" in Path(overrides).read_text()
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/last.ckpt"]

    # The summary names the objective, the run and how to open the UI.
    assert f"MLflow run {run.info.run_id}" in result.stderr + result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("data", "metric"),
    [("average", "val/rmse"), ("adding", "val/acc"), ("echo", "val/acc")],
)
def test_each_dataset_trains_and_logs_its_metric(run_train, tracking_uri, data, metric) -> None:
    result = run_train(f"data={data}", "tbptt.k=7")
    assert result.returncode == 0, result.stderr
    _, run = _only_run(tracking_uri)
    assert metric in run.data.metrics
    assert run.data.metrics["val/loss"] > 0


def test_text_reports_bits_per_character(run_train, tracking_uri, tmp_path) -> None:
    text = tmp_path / "play.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    result = run_train("data=text", f"data.path={text}", "data.seq_len=16", "data.batch_size=4")
    assert result.returncode == 0, result.stderr
    _, run = _only_run(tracking_uri)
    assert run.data.metrics["val/bpc"] == pytest.approx(run.data.metrics["val/loss"] / 0.693147,
                                                         rel=1e-4)
    assert run.data.params["tbptt.stream"] == "null"
    assert run.data.tags["dataset"] == "text"


def test_same_seed_same_metrics(run_train, tracking_uri) -> None:
    for _ in range(2):
        assert run_train("seed=3", "tbptt.k=4").returncode == 0
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tbptt-lab").experiment_id])
    first, second = (run.data.metrics for run in runs)
    for name in ["train/loss", "val/loss", "val/acc"]:
        assert first[name] == second[name], name


def test_a_different_seed_gives_different_metrics(run_train, tracking_uri) -> None:
    assert run_train("seed=1").returncode == 0
    assert run_train("seed=2").returncode == 0
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tbptt-lab").experiment_id])
    assert runs[0].data.metrics["val/loss"] != runs[1].data.metrics["val/loss"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tbptt.k=0"], "tbptt.k must be a positive integer, but got 0"),
        (["tbptt.k=-3"], "tbptt.k must be a positive integer, but got -3"),
        (["tbptt.k=2.5"], "tbptt.k must be a positive integer, but got 2.5"),
        (["optimizer.lr=0"], "optimizer.lr must be a positive finite number, but got 0"),
        (["data=text"], "data.path must name a text file"),
        (["data=text", "data.path=/no/such/file.txt"], "does not exist"),
    ],
)
def test_bad_input_fails_before_training(run_train, tmp_path, args, message) -> None:
    result = run_train(*args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing was started: no MLflow store was even created.
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_dataset_lists_the_available_ones(run_train) -> None:
    result = run_train("data=nope", timeout=60)
    assert result.returncode != 0
    assert "data/nope" in result.stderr
    for name in ["adding", "average", "echo", "text"]:
        assert name in result.stderr


def test_help_does_not_import_torch_or_lightning(tmp_path) -> None:
    code = (
        "import sys, runpy\n"
        "sys.argv = ['src.train', '--help']\n"
        "try:\n"
        "    runpy.run_module('src.train', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert "tbptt: fixed, k1k2, random" in result.stdout
    assert "HEAVY []" in result.stdout
