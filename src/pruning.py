"""A job's side of an Optuna sweep: find its trial, report to it each epoch, stop when pruned.

The tbptt_optuna sweeper launches each trial as a Hydra job with `hydra.sweeper.trial.id` set.
The job loads the study from its storage (the same journal file or database the sweeper uses,
so it works in another process or on another host) with the sweep's pruner, which a study does
not store. After every validation it reports the objective and raises `optuna.TrialPruned` if
the pruner says so; the sweeper then tells Optuna the trial was PRUNED, and train() ends the
MLflow run KILLED with the tag `trial.state=PRUNED`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from hydra_plugins.tbptt_optuna_sweeper.study import load_study, make_pruner

if TYPE_CHECKING:
    import optuna


class SweepTrial:
    """The Optuna trial that this job runs, reached through the study's storage."""

    def __init__(self, trial: optuna.Trial, study_name: str, metric: str | None) -> None:
        self.trial = trial
        self.study_name = study_name
        # None for several objectives: Optuna prunes on one value only.
        self.metric = metric
        self.pruned_at: int | None = None

    def tags(self) -> dict[str, str]:
        """MLflow tags that link the run to its trial (src/report.py reads `trial.*`)."""
        return {"optuna.study_name": self.study_name, "trial.number": str(self.trial.number)}

    def attach_run(self, run_id: str) -> None:
        """Record the trial's MLflow run, and the process that trains it, on the trial."""
        self.trial.set_user_attr("mlflow_run_id", run_id)
        self.trial.set_user_attr("job_pid", os.getpid())

    def callbacks(self) -> list[pl.Callback]:
        return [] if self.metric is None else [PruningCallback(self)]

    def state(self, run_status: str) -> str:
        """The trial's end in Optuna's words, for the MLflow tag `trial.state`."""
        if self.pruned_at is not None:
            return "PRUNED"
        return "COMPLETE" if run_status == "FINISHED" else "FAIL"


class PruningCallback(pl.Callback):
    """Report the objective after each validation; raise `optuna.TrialPruned` when told."""

    def __init__(self, sweep_trial: SweepTrial) -> None:
        self.sweep_trial = sweep_trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = self.sweep_trial.metric
        if metric not in trainer.callback_metrics:
            raise KeyError(
                f"optimized_metric names {metric!r}, which this run did not log; logged "
                f"metrics are {', '.join(sorted(trainer.callback_metrics))}"
            )
        epoch = trainer.current_epoch
        value = float(trainer.callback_metrics[metric])
        trial = self.sweep_trial.trial
        trial.report(value, step=epoch)
        if trial.should_prune():
            import optuna

            self.sweep_trial.pruned_at = epoch
            trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"{metric} = {value:.6g} after epoch {epoch}")


def sweep_trial(sweeper_cfg: Any, optimized_metric: Any) -> SweepTrial | None:
    """The trial this job runs, or None when no tbptt_optuna sweep launched it."""
    ref = sweeper_cfg.get("trial") if sweeper_cfg is not None else None
    if not ref or ref.get("id") is None:
        return None
    import optuna  # only in a job of an Optuna sweep

    pruner = make_pruner(sweeper_cfg.pruner, sweeper_cfg.get("pruner_options"))
    study = load_study(sweeper_cfg.storage, sweeper_cfg.study_name, pruner=pruner)
    metric = None if len(study.directions) > 1 else _first(optimized_metric)
    return SweepTrial(optuna.trial.Trial(study, int(ref.id)), sweeper_cfg.study_name, metric)


def _first(optimized_metric: Any) -> str:
    if isinstance(optimized_metric, str):
        return optimized_metric
    return str(list(optimized_metric)[0])
