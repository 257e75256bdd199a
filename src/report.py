"""The report of a sweep, built from MLflow alone: the trials as a table, plots, the best config.

    python -m src.report tbptt-lab                   # the latest sweep of experiment tbptt-lab
    python -m src.report 3f2a9c...                   # the sweep with this parent run id
    python -m src.report tbptt-lab --tracking-uri http://127.0.0.1:5000 --out reports/k

The files go to --out and to the parent run's artifacts under `report/`:

    README.md           the summary, the plots and the table, to read first
    trials.csv          one row per trial: k, lr, objective, state, epochs, wall time, throughput
    trials.md           the same table in Markdown
    objective_vs_k.png  the objective against k, a line per learning rate (a scatter if many)
    val_curves.png      the objective per epoch of every trial on one chart
    history.png         the objective of each trial in order, with the best so far
    importances.png     how much each swept parameter explains the objective (fANOVA)
    pareto.png          the Pareto front, for a sweep with several objectives
    best_config.yaml    the resolved config of the best trial, with the command that reruns it
    summary.json        the counts and the best value, also logged as metrics of the parent

When the sweep was an Optuna study and the study is at hand, its trial states (PRUNED is known
only there), values and search space take precedence over what MLflow recorded; each child run
is then tagged with its trial's final state.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

K_PARAM = "tbptt.k"
LR_PARAM = "optimizer.lr"
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
# MLflow's end state of a child run, when no Optuna state was recorded for it.
RUN_STATUS_STATE = {
    "FINISHED": "COMPLETE",
    "FAILED": "FAIL",
    "KILLED": "FAIL",
    "RUNNING": "RUNNING",
    "SCHEDULED": "RUNNING",
}
# Where the sweeper may put a job's Optuna trial number: a tag, or a config key (a param).
TRIAL_NUMBER_KEYS = ("trial.number", "optuna.trial_number", "optuna.trial.number")
# Params that differ between runs without being part of what was swept.
NOT_SWEPT = re.compile(r"^(logger\.|hydra\.|ckpt_path$|optuna\.trial)")
MAXIMIZED = re.compile(r"(acc|accuracy|auc|f1|per_second|throughput)$")
REPORT_FILES = (
    "README.md", "trials.csv", "trials.md", "objective_vs_k.png", "val_curves.png",
    "history.png", "importances.png", "pareto.png", "best_config.yaml", "summary.json",
)


def infer_direction(metric: str) -> str:
    """`maximize` for accuracies and throughputs, `minimize` for losses and anything else."""
    return "maximize" if MAXIMIZED.search(metric) else "minimize"


@dataclass
class Trial:
    """One job of the sweep, as MLflow (and, if at hand, the Optuna study) recorded it."""

    number: int
    state: str
    params: dict[str, str]
    values: list[float | None]
    curve: list[float] = field(default_factory=list)
    run_id: str = ""
    name: str = ""
    epochs: int | None = None
    wall_seconds: float | None = None
    throughput: float | None = None

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE" and all(_finite(value) for value in self.values)


@dataclass
class SweepRecord:
    """A sweep read back: its parent run, objectives and trials."""

    parent_run_id: str
    name: str
    experiment_name: str
    objectives: list[str]
    directions: list[str]
    swept_keys: list[str]
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)

    def best(self) -> Trial | None:
        """The complete trial best on the first objective."""
        complete = [trial for trial in self.trials if trial.complete]
        if not complete:
            return None
        sign = 1.0 if self.directions[0] == "minimize" else -1.0
        return min(complete, key=lambda trial: sign * trial.values[0])

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for trial in self.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        return counts


@dataclass
class Summary:
    """What the report found, for the log line and the parent run's metrics."""

    name: str
    parent_run_id: str
    objective: str
    direction: str
    counts: dict[str, int]
    best_value: float | None
    best_trial: int | None
    best_run_id: str | None
    best_params: str
    files: list[str]

    def headline(self) -> str:
        counts = self.counts
        text = (
            f"Sweep {self.name!r}: {sum(counts.values())} trials, {counts['COMPLETE']} "
            f"complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
        )
        if counts.get("RUNNING"):
            text += f", {counts['RUNNING']} running"
        if self.best_value is not None:
            text += (
                f". Best {self.objective} = {self.best_value:.4g} ({self.direction}) in trial "
                f"#{self.best_trial}: {self.best_params or 'the defaults'}"
            )
        return text

    def metrics(self) -> dict[str, float]:
        metrics = {
            "sweep/trials": float(sum(self.counts.values())),
            "sweep/trials_complete": float(self.counts["COMPLETE"]),
            "sweep/trials_pruned": float(self.counts["PRUNED"]),
            "sweep/trials_failed": float(self.counts["FAIL"]),
            "sweep/trials_running": float(self.counts.get("RUNNING", 0)),
        }
        if self.best_value is not None:
            metrics["sweep/best_value"] = float(self.best_value)
            # Under the objective's own name too, so that in the UI's runs table the parent
            # row shows the best trial's value in the column of its children's values.
            metrics[self.objective] = float(self.best_value)
        return metrics


# ---- reading the sweep -------------------------------------------------------------------


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every child run of the parent, oldest first."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            f"tags.mlflow.parentRunId = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def read_sweep(
    client: MlflowClient, parent_run_id: str, study: optuna.Study | None = None
) -> SweepRecord:
    """The sweep under `parent_run_id`: its trials from the child runs (and the study)."""
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    experiment = client.get_experiment(parent.info.experiment_id)
    runs = child_runs(client, parent.info.experiment_id, parent_run_id)

    objectives = _split(tags.get("sweep.objective")) or _objectives_from_params(runs)
    directions = _split(tags.get("sweep.direction"))
    if study is not None and len(study.directions) == len(objectives):
        directions = [direction.name.lower() for direction in study.directions]
    if len(directions) != len(objectives):
        directions = [infer_direction(metric) for metric in objectives]

    trials = [_trial_from_run(client, run, index, objectives) for index, run in enumerate(runs)]
    record = SweepRecord(
        parent_run_id=parent_run_id,
        name=tags.get("sweep.name") or parent.info.run_name or parent_run_id,
        experiment_name=experiment.name,
        objectives=objectives,
        directions=directions,
        swept_keys=_split(tags.get("sweep.params")) or _varying_params(trials),
        trials=trials,
    )
    if study is not None:
        _merge_study(record, study)
    record.trials.sort(key=lambda trial: trial.number)
    return record


def _trial_from_run(client: MlflowClient, run: Run, index: int, objectives: list[str]) -> Trial:
    metrics = run.data.metrics
    tags = run.data.tags
    history = client.get_metric_history(run.info.run_id, objectives[0])
    curve = [point.value for point in sorted(history, key=lambda p: (p.step, p.timestamp))]
    epochs = int(metrics["epoch"]) + 1 if "epoch" in metrics else (len(curve) or None)
    wall = None
    if run.info.end_time and run.info.start_time:
        wall = (run.info.end_time - run.info.start_time) / 1000.0
    elif "perf/wall_seconds" in metrics:
        wall = metrics["perf/wall_seconds"]
    return Trial(
        number=_trial_number(run, index),
        state=tags.get("trial.state") or RUN_STATUS_STATE.get(run.info.status, "FAIL"),
        params=dict(run.data.params),
        values=[metrics.get(metric) for metric in objectives],
        curve=curve,
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        epochs=epochs,
        wall_seconds=wall,
        throughput=metrics.get("perf/timesteps_per_second"),
    )


def _trial_number(run: Run, index: int) -> int:
    for key in TRIAL_NUMBER_KEYS:
        value = run.data.tags.get(key) or run.data.params.get(key)
        if value is not None and value.lstrip("-").isdigit():
            return int(value)
    job = run.data.tags.get("sweep.job")
    return int(job) if job is not None and job.isdigit() else index


def _has_trial_number(trial: Trial) -> bool:
    return any(key in trial.params for key in TRIAL_NUMBER_KEYS)


def _objectives_from_params(runs: list[Run]) -> list[str]:
    for run in runs:
        value = run.data.params.get("optimized_metric")
        if value:
            return [item.strip(" '\"") for item in value.strip("[]").split(",") if item.strip()]
    return ["val/loss"]


def _varying_params(trials: list[Trial]) -> list[str]:
    keys = sorted({key for trial in trials for key in trial.params})
    return [
        key
        for key in keys
        if not NOT_SWEPT.search(key) and len({trial.params.get(key) for trial in trials}) > 1
    ]


def _merge_study(record: SweepRecord, study: optuna.Study) -> None:
    """Let the study decide states and values; add trials that never made a run."""
    by_number = {trial.number: trial for trial in record.trials}
    for frozen in study.get_trials(deepcopy=False):
        state = "FAIL" if frozen.state.name == "FAIL" else frozen.state.name
        if state == "WAITING":
            state = "RUNNING"
        trial = by_number.get(frozen.number)
        if trial is None:
            trial = Trial(
                number=frozen.number,
                state=state,
                params={key: str(value) for key, value in frozen.params.items()},
                values=[None] * len(record.objectives),
                curve=[frozen.intermediate_values[step] for step in sorted(
                    frozen.intermediate_values
                )],
                name=f"trial {frozen.number} (no MLflow run)",
            )
            record.trials.append(trial)
        trial.state = state
        if frozen.values is not None and len(frozen.values) == len(record.objectives):
            trial.values = [float(value) for value in frozen.values]
    missing = [trial.number for trial in record.trials if not trial.run_id]
    if missing:
        record.notes.append(
            f"Trials {', '.join(map(str, missing))} are in the Optuna study but have no MLflow "
            "run (they failed before training started, or ran with another tracking store)."
        )


# ---- the study behind an Optuna sweep ----------------------------------------------------


def load_study(study_name: str, storage: str | None) -> optuna.Study | None:
    """The Optuna study, or None when its storage is not known or cannot be opened here."""
    if not storage or "***" in storage:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" in storage:
        backend: Any = storage
    else:
        if not Path(storage).exists():
            return None
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        backend = JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=study_name, storage=backend)


# ---- tables ------------------------------------------------------------------------------


def trial_table(record: SweepRecord) -> tuple[list[str], list[list[Any]]]:
    """The columns and rows of the trials table, one row per trial in order."""
    keys = [K_PARAM, LR_PARAM] + [
        key for key in record.swept_keys if key not in (K_PARAM, LR_PARAM)
    ]
    columns = ["trial", *keys, *record.objectives, "state", "epochs", "wall_s",
               "timesteps_per_s", "run_id", "run_name"]
    rows = []
    for trial in record.trials:
        rows.append([
            trial.number,
            *(_parse(trial.params.get(key, "")) for key in keys),
            *trial.values,
            trial.state,
            trial.epochs,
            trial.wall_seconds,
            trial.throughput,
            trial.run_id,
            trial.name,
        ])
    return columns, rows


def write_csv(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([["" if value is None else value for value in row] for row in rows])


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers to four significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if _numeric_column(rows, i) else "---" for i in range(len(columns)))
        + "|",
    ]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _numeric_column(rows: list[list[Any]], index: int) -> bool:
    values = [row[index] for row in rows if row[index] is not None]
    return bool(values) and all(isinstance(value, int | float) for value in values)


# ---- numbers -----------------------------------------------------------------------------


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (at least as good in every objective,
    better in one)."""
    signs = [1.0 if direction == "minimize" else -1.0 for direction in directions]
    scaled = [[sign * value for sign, value in zip(signs, point, strict=True)] for point in points]
    front = []
    for i, point in enumerate(scaled):
        dominated = any(
            all(o <= p for o, p in zip(other, point, strict=True)) and other != point
            for j, other in enumerate(scaled)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def param_importances(
    record: SweepRecord, study: optuna.Study | None = None
) -> tuple[dict[str, dict[str, float]], str | None]:
    """fANOVA importances per objective, or a note that says why there are none.

    Taken from the Optuna study when it is at hand (its search space is exact); otherwise
    from the runs, in an in-memory study whose ranges are those the trials covered.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    complete = [trial for trial in record.trials if trial.complete]
    if len(complete) < 2:
        return {}, f"Parameter importances need two complete trials; this sweep has " \
                   f"{len(complete)}."
    keys = [
        key for key in record.swept_keys
        if len({trial.params.get(key) for trial in complete}) > 1
    ]
    if study is None or not any(t.state.name == "COMPLETE" for t in study.get_trials()):
        if not keys:
            return {}, "Parameter importances need a swept parameter that varies across the " \
                       "complete trials; none does."
        study = _study_from_trials(complete, keys, record.directions)
    importances = {}
    for index, metric in enumerate(record.objectives):
        target = None if len(record.objectives) == 1 else (lambda t, i=index: t.values[i])
        try:
            importances[metric] = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=0), target=target
            )
        except (ValueError, RuntimeError) as error:
            return {}, f"Parameter importances could not be computed: {error}"
    return importances, None


def _study_from_trials(
    trials: list[Trial], keys: list[str], directions: list[str]
) -> optuna.Study:
    import optuna

    distributions = {key: _distribution([_parse(t.params[key]) for t in trials]) for key in keys}
    study = optuna.create_study(directions=directions)
    for trial in trials:
        params = {}
        for key in keys:
            value = _parse(trial.params[key])
            params[key] = str(value) if isinstance(
                distributions[key], optuna.distributions.CategoricalDistribution
            ) else value
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, values=trial.values
        ))
    return study


def _distribution(values: list[Any]) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if all(isinstance(value, int) for value in values):
        return IntDistribution(min(values), max(values))
    if all(isinstance(value, int | float) for value in values):
        low, high = float(min(values)), float(max(values))
        # Learning rates and the like are swept over decades.
        return FloatDistribution(low, high, log=low > 0 and high / low >= 100)
    return CategoricalDistribution(sorted({str(value) for value in values}))


def _parse(text: str) -> Any:
    """A param as MLflow stores it (a string) back to an int or a float where it is one."""
    if not isinstance(text, str):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


# ---- the report --------------------------------------------------------------------------


def build_report(
    client: MlflowClient,
    parent_run_id: str,
    out_dir: str | Path,
    study: optuna.Study | None = None,
    upload: bool = True,
) -> Summary:
    """Write the sweep's report into `out_dir` and, with `upload`, onto the parent run.

    Args:
        client: A client of the store that holds the sweep.
        parent_run_id: The sweep's parent run.
        out_dir: The folder to write (created; report files already there are replaced).
        study: The sweep's Optuna study, if at hand: its states and search space win.
        upload: Also log the files as artifacts (`report/`), the counts and the best value as
            metrics and the best trial as tags of the parent run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)

    record = read_sweep(client, parent_run_id, study)
    if not record.trials:
        record.notes.append("The sweep has no trials yet.")
    columns, rows = trial_table(record)
    write_csv(out / "trials.csv", columns, rows)
    (out / "trials.md").write_text(markdown_table(columns, rows))

    from src import plots

    drawings = {
        "objective_vs_k.png": plots.objective_vs_k,
        "val_curves.png": plots.curves,
        "history.png": plots.history,
    }
    if len(record.objectives) > 1:
        drawings["pareto.png"] = plots.pareto
    for name, draw in drawings.items():
        note = draw(record, out / name)
        if note:
            record.notes.append(note)
    importances, note = param_importances(record, study)
    if importances:
        plots.importances(importances, out / "importances.png")
    else:
        record.notes.append(note or "No parameter importances.")

    best = record.best()
    if best is not None:
        (out / "best_config.yaml").write_text(best_config(client, record, best))
    summary = _summary(record, best)
    written = {path.name for path in out.iterdir()}
    summary.files = [name for name in REPORT_FILES if name in written or name in (
        "README.md", "summary.json"
    )]
    (out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2) + "\n")
    (out / "README.md").write_text(readme(record, summary, columns, rows, importances))

    if upload:
        _upload(client, record, summary, out, study is not None)
    return summary


def best_config(client: MlflowClient, record: SweepRecord, best: Trial) -> str:
    """The best trial's resolved config, headed by its value and the command that reruns it."""
    config = overrides = None
    if best.run_id:
        config = _artifact_text(client, best.run_id, "config/config.yaml")
        overrides = _artifact_text(client, best.run_id, "config/overrides.txt")
    if config is None:
        import yaml

        config = yaml.safe_dump(
            {key: _parse(value) for key, value in best.params.items()}, sort_keys=True
        )
    rerun = " ".join(line for line in (overrides or "").splitlines() if line.strip())
    if not rerun:
        rerun = " ".join(f"{key}={best.params[key]}" for key in record.swept_keys
                         if key in best.params)
    header = [
        f"# Best trial of sweep {record.name!r}: #{best.number}, run {best.run_id or '-'}",
        f"# {record.objectives[0]} = {best.values[0]:.6g} ({record.directions[0]})",
        f"# Rerun it: python -m src.train {rerun}".rstrip(),
    ]
    return "\n".join(header) + "\n" + config


def _artifact_text(client: MlflowClient, run_id: str, path: str) -> str | None:
    # A progress bar per small file is noise in a sweep's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = client.download_artifacts(run_id, path, folder)
        except Exception:
            return None
        return Path(local).read_text()


def _summary(record: SweepRecord, best: Trial | None) -> Summary:
    return Summary(
        name=record.name,
        parent_run_id=record.parent_run_id,
        objective=record.objectives[0],
        direction=record.directions[0],
        counts=record.counts(),
        best_value=None if best is None else best.values[0],
        best_trial=None if best is None else best.number,
        best_run_id=None if best is None else best.run_id or None,
        best_params="" if best is None else ", ".join(
            f"{key}={best.params[key]}" for key in record.swept_keys if key in best.params
        ),
        files=[],
    )


def readme(
    record: SweepRecord,
    summary: Summary,
    columns: list[str],
    rows: list[list[Any]],
    importances: dict[str, dict[str, float]],
) -> str:
    """The report's front page, in Markdown."""
    objectives = ", ".join(
        f"`{metric}` ({direction})"
        for metric, direction in zip(record.objectives, record.directions, strict=True)
    )
    lines = [
        f"# Sweep {record.name}",
        "",
        f"Parent run `{record.parent_run_id}` in experiment `{record.experiment_name}`. "
        f"Objective: {objectives}. Swept: {', '.join(record.swept_keys) or 'nothing'}.",
        "",
        summary.headline() + ".",
        "",
    ]
    if record.notes:
        lines += ["Notes:", "", *(f"- {note}" for note in record.notes), ""]
    if importances:
        for metric, values in importances.items():
            ranked = ", ".join(f"{name} {value:.2f}" for name, value in values.items())
            lines.append(f"Importances for `{metric}`: {ranked}.")
        lines.append("")
    for name, title in (
        ("objective_vs_k.png", "Objective against k"),
        ("val_curves.png", "Curves of all trials"),
        ("history.png", "Optimisation history"),
        ("importances.png", "Parameter importances"),
        ("pareto.png", "Pareto front"),
    ):
        if name in summary.files:
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["## Trials", "", markdown_table(columns, rows)]
    if summary.best_value is not None:
        lines += ["The best trial's config: [best_config.yaml](best_config.yaml).", ""]
    return "\n".join(lines)


def _upload(
    client: MlflowClient, record: SweepRecord, summary: Summary, out: Path, tag_states: bool
) -> None:
    from mlflow.entities import Metric

    run_id = record.parent_run_id
    client.log_artifacts(run_id, str(out), "report")
    now = int(time.time() * 1000)
    step = sum(summary.counts.values())
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, step) for key, value in summary.metrics().items()],
    )
    if summary.best_run_id:
        client.set_tag(run_id, "best.run_id", summary.best_run_id)
        client.set_tag(run_id, "best.trial", str(summary.best_trial))
        client.set_tag(run_id, "best.params", summary.best_params[:5000])
    if tag_states:
        # The study knows what MLflow cannot: which trials were pruned.
        for trial in record.trials:
            if trial.run_id:
                client.set_tag(trial.run_id, "trial.state", trial.state)
                client.set_tag(trial.run_id, "trial.number", str(trial.number))


# ---- command line ------------------------------------------------------------------------


def find_sweep(client: MlflowClient, target: str) -> str:
    """The parent run id that `target` (an experiment name or a run id) names.

    Raises:
        LookupError: Nothing matches; the message lists what there is.
    """
    if re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            run = client.get_run(target)
        except Exception:
            run = None
        if run is not None:
            # A child run stands for its sweep.
            return run.data.tags.get("mlflow.parentRunId") or run.info.run_id
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(max_results=100))
        raise LookupError(
            f"no experiment and no run named {target!r}; experiments are: "
            f"{', '.join(names) or '(none)'}"
        )
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.`sweep.role` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise LookupError(
            f"experiment {target!r} has no sweep parent run; a sweep "
            f"(`python -m src.train -m ...`) creates one"
        )
    return parents[0].info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.report",
        description="Build the report of a sweep (table, plots, best config) from MLflow.",
    )
    parser.add_argument(
        "target", help="an experiment name (its latest sweep) or a sweep's parent run id"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "in the current folder)",
    )
    parser.add_argument("--out", help="folder to write the report to (default: reports/<name>)")
    parser.add_argument(
        "--no-upload", action="store_true", help="do not log the report to the parent run"
    )
    parser.add_argument("--study-name", help="the sweep's Optuna study (default: from tags)")
    parser.add_argument("--storage", help="the Optuna storage URL or journal file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from src import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        print(f"error: no MLflow store at {uri}; pass --tracking-uri", file=sys.stderr)
        return 2
    try:
        client = tracking.client_for(uri)
        parent_run_id = find_sweep(client, args.target)
    except tracking.TrackingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    study = _study_for(client, parent_run_id, args.study_name, args.storage)
    tags = client.get_run(parent_run_id).data.tags
    out = Path(args.out or Path("reports") / _folder_name(tags.get("sweep.name"), parent_run_id))
    summary = build_report(client, parent_run_id, out, study=study, upload=not args.no_upload)
    print(summary.headline())
    print(f"Report: {out / 'README.md'}" + ("" if args.no_upload else
          f" (also in the artifacts of run {parent_run_id}, under report/)"))
    return 0


def _study_for(
    client: MlflowClient, parent_run_id: str, study_name: str | None, storage: str | None
) -> optuna.Study | None:
    tags = client.get_run(parent_run_id).data.tags
    study_name = study_name or tags.get("optuna.study_name")
    storage = storage or tags.get("optuna.storage")
    if not study_name:
        return None
    try:
        study = load_study(study_name, storage)
    except Exception as error:
        log.warning("the Optuna study %r could not be opened (%s); reporting from MLflow alone",
                    study_name, error)
        return None
    if study is None:
        log.info("the Optuna study %r is not at hand here; reporting from MLflow alone",
                 study_name)
    return study


def _folder_name(name: str | None, run_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", name or "sweep").strip("_")[:60]
    return f"{slug}-{run_id[:8]}"


if __name__ == "__main__":
    sys.exit(main())
