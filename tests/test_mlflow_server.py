"""A grid sweep against a real MLflow tracking server, read back by MLflow's client, by
`python -m src.report`, and by headless Chromium in the MLflow UI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, subprocess_env, with_defaults
from servers import mlflow_server  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.server, pytest.mark.slow]

KS = ("2", "4", "8")
EPOCHS = 2
EXPERIMENT = "server-grid"
CHROMIUM = "/usr/bin/chromium"
# Where to copy the screenshot for the README (docs/); unset, it stays in the test's folder.
SCREENSHOT_ENV = "TBPTT_SCREENSHOT_DIR"


@pytest.fixture(scope="module")
def grid(mlflow_server, tmp_path_factory):  # noqa: F811 (pytest's fixture injection)
    """`python -m src.train -m tbptt.k=2,4,8` against the server, then its parent run."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("grid")
    args = [f"tbptt.k={','.join(KS)}", f"logger.experiment_name={EXPERIMENT}",
            f"trainer.max_epochs={EPOCHS}"]
    command = [sys.executable, "-m", "src.train", "-m",
               *with_defaults(args, [*TINY, "trainer.num_threads=1"])]
    result = subprocess.run(
        command, cwd=folder, env=subprocess_env(mlflow_server), capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'parent'")
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return client, experiment, parent, children, folder


def test_the_grid_is_one_parent_run_with_a_child_per_job(grid) -> None:
    client, experiment, parent, children, _ = grid

    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == f"tbptt.k={','.join(KS)}"
    assert sorted(run.data.params["tbptt.k"] for run in children) == sorted(KS)
    # The only runs of the experiment: no job ran top-level.
    assert len(client.search_runs([experiment.experiment_id])) == 1 + len(KS)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep.id"] == parent.data.tags["sweep.id"]
        history = client.get_metric_history(run.info.run_id, "val/loss")
        assert len(history) == EPOCHS, run.data.params["tbptt.k"]
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == EPOCHS


def test_the_report_is_on_the_parent_run(grid) -> None:
    client, _, parent, children, folder = grid
    run_id = parent.info.run_id

    artifacts = {item.path for item in client.list_artifacts(run_id, "report")}
    expected = ["README.md", "trials.csv", "trials.md", "objective_vs_k.png", "val_curves.png",
                "history.png", "importances.png", "best_config.yaml", "summary.json"]
    assert {f"report/{name}" for name in expected} <= artifacts
    metrics = client.get_run(run_id).data.metrics
    assert metrics["sweep/trials_complete"] == len(KS) and metrics["sweep/trials_failed"] == 0
    best = min(children, key=lambda run: run.data.metrics["val/loss"])
    assert metrics["sweep/best_value"] == pytest.approx(best.data.metrics["val/loss"])
    # The parent row of the runs table shows the best value in the objective's column.
    assert metrics["val/loss"] == metrics["sweep/best_value"]
    assert client.get_run(run_id).data.tags["best.run_id"] == best.info.run_id
    # The same files sit in the sweep's folder.
    (local,) = folder.glob("multirun/*/*/report")
    assert {path.name for path in local.iterdir()} >= set(expected)


def test_report_command_against_the_server(grid, mlflow_server, tmp_path) -> None:  # noqa: F811
    client, _, parent, _, _ = grid
    env = subprocess_env()

    def report(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "src.report", *args, "--tracking-uri", mlflow_server],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
        )

    by_name = report(EXPERIMENT, "--out", "by-name")
    assert by_name.returncode == 0, by_name.stderr[-3000:]
    assert f"{len(KS)} trials, {len(KS)} complete" in by_name.stdout
    rows = (tmp_path / "by-name" / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + len(KS)
    for name in ("objective_vs_k.png", "val_curves.png", "history.png"):
        assert (tmp_path / "by-name" / name).read_bytes().startswith(b"\x89PNG")

    by_id = report(parent.info.run_id, "--out", "by-id", "--no-upload")
    assert by_id.returncode == 0, by_id.stderr[-3000:]
    assert (tmp_path / "by-id" / "trials.csv").read_text() == (
        tmp_path / "by-name" / "trials.csv"
    ).read_text()

    missing = report("no-such-experiment")
    assert missing.returncode == 2
    assert "no experiment and no run named 'no-such-experiment'" in missing.stderr
    assert EXPERIMENT in missing.stderr  # it lists the experiments there are


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_the_mlflow_ui_shows_the_parent_and_its_children(
    grid, mlflow_server, tmp_path  # noqa: F811
) -> None:
    from playwright.sync_api import sync_playwright

    _, experiment, parent, children, _ = grid
    screenshot = tmp_path / "mlflow-sweep.png"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-background-networking",
                  "--disable-component-update", "--disable-gpu"],
        )
        try:
            page = browser.new_page(viewport={"width": 1700, "height": 560})
            # MLflow 3's /#/experiments/<id> opens a GenAI overview; the runs table is here.
            page.goto(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs")
            parent_link = page.locator(f'a[href$="/runs/{parent.info.run_id}"]').first
            parent_link.wait_for(timeout=60_000)
            assert parent_link.inner_text() == parent.info.run_name
            _close_assistant(page)

            # Children start folded under their parent: only the parent row shows.
            child_links = [page.locator(f'a[href$="/runs/{run.info.run_id}"]') for run in children]
            assert all(link.count() == 0 for link in child_links)
            row = page.locator(f'[role="row"]:has(a[href$="/runs/{parent.info.run_id}"])')
            row.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
            for link, run in zip(child_links, children, strict=True):
                link.first.wait_for(timeout=15_000)
                assert link.first.inner_text() == run.info.run_name

            _show_columns(page, ["tbptt.k", "val/loss"])
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()

    assert screenshot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(screenshot, Path(os.environ[SCREENSHOT_ENV]) / screenshot.name)


def _close_assistant(page) -> None:
    # MLflow 3.17 opens an "MLflow Assistant" side panel over the table on first visit.
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _show_columns(page, names: list[str]) -> None:
    """Tick param and metric columns in the Columns menu (the UI hides them at first)."""
    page.get_by_role("button", name="Columns", exact=True).click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        # The menu is a tree: a node per column, a checkbox and the name in each.
        node = page.locator('[class*="tree-treenode"]').filter(
            has=page.get_by_text(name, exact=True)
        )
        node.locator('[class*="tree-checkbox"]').first.click()
    page.keyboard.press("Escape")
    for name in names:
        page.locator('[role="columnheader"]', has_text=name).first.wait_for(timeout=10_000)
