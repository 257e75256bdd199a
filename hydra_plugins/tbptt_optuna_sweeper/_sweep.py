"""The sweep: ask Optuna for a batch of trials, launch them as Hydra jobs, tell how each ended.

A job reaches its trial through the study's storage (the sweeper passes the trial's id as
`hydra.sweeper.trial.id`), reports its validation loss per epoch there, and raises
`optuna.TrialPruned` when the pruner stops it. Nothing about a trial lives only in memory, so
the same loop works with the in-process launcher and with launchers that run jobs elsewhere.

Which trials count towards `n_trials`: those that ran to an end, COMPLETE, PRUNED, or FAIL
with an error of their own (the user attr `error`), plus those RUNNING. A trial cut off
because its sweep stopped (Ctrl-C, a killed process) is FAIL with the user attr
`interrupted` and does not count, so running the same command again runs its slot again.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import socket
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    check_distribution_compatibility,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import TrialState

from hydra_plugins.tbptt_optuna_sweeper.search_space import (
    SearchSpace,
    override_for,
    parse_search_space,
    quote_value,
)
from hydra_plugins.tbptt_optuna_sweeper.study import (
    SweepConfigError,
    display_location,
    grid_of,
    make_pruner,
    make_sampler,
    open_storage,
    storage_location,
)
from hydra_plugins.tbptt_optuna_sweeper.workers import (
    Heartbeat,
    fail_stale_trials,
    heartbeat_storage_kwargs,
    heartbeats_on,
    study_lock,
)

if TYPE_CHECKING:
    from hydra_plugins.tbptt_optuna_sweeper.sweeper import TbpttOptunaSweeper

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
DIRECTIONS = ("minimize", "maximize")
# Hydra's default job folder; the sweeper names job folders after trial numbers instead, so
# that a resumed sweep does not write over the folders of the trials it ran before.
DEFAULT_SUBDIR = "${hydra.job.num}"


class SweepStopped(CompactHydraException, RuntimeError):
    """Too many trials failed: the sweep stops, and the message says why."""


@dataclass
class Settings:
    """The sweeper's config, checked: every value here can work."""

    sampler: str
    seed: int | None
    sampler_options: dict[str, Any]
    pruner: str
    pruner_options: dict[str, Any]
    directions: list[str]
    metrics: list[str]
    storage: str
    study_name: str
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    params: dict[str, Any]
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    max_retry: int | None = None

    @classmethod
    def from_config(cls, settings: dict[str, Any], optimized_metric: Any) -> Settings:
        def plain(value: Any) -> Any:
            if isinstance(value, DictConfig | ListConfig):
                return OmegaConf.to_container(value, resolve=True)
            return value

        settings = {key: plain(value) for key, value in settings.items()}
        metrics = _metric_names(optimized_metric)
        directions = _directions(settings.get("directions") or settings["direction"], metrics)
        pruner = settings["pruner"]
        if len(directions) > 1 and pruner != "none":
            raise SweepConfigError(
                f"hydra.sweeper.pruner must be none for a study with {len(directions)} "
                f"objectives (Optuna prunes on a single value), but got {pruner!r}."
            )
        n_trials = settings["n_trials"]
        if not _is_int(n_trials) or n_trials < 1:
            raise SweepConfigError(
                f"hydra.sweeper.n_trials must be a positive integer, but got {n_trials!r}."
            )
        rate = settings["max_failure_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise SweepConfigError(
                f"hydra.sweeper.max_failure_rate must be a number from 0 to 1, but got {rate!r}."
            )
        study_name = settings["study_name"]
        if not isinstance(study_name, str) or not study_name.strip():
            raise SweepConfigError(
                f"hydra.sweeper.study_name must be a non-empty string, but got {study_name!r}."
            )
        for key in ("heartbeat_interval", "grace_period", "max_retry"):
            value = settings.get(key)
            if value is not None and (not _is_int(value) or value < (0 if key == "max_retry"
                                                                       else 1)):
                raise SweepConfigError(
                    f"hydra.sweeper.{key} must be a positive integer or null, but got {value!r}."
                )
        seed = settings["seed"]
        if seed is not None and not _is_int(seed):
            raise SweepConfigError(
                f"hydra.sweeper.seed must be an integer or null, but got {seed!r}."
            )
        return cls(
            sampler=settings["sampler"],
            seed=seed,
            sampler_options=dict(settings.get("sampler_options") or {}),
            pruner=pruner,
            pruner_options=dict(settings.get("pruner_options") or {}),
            directions=directions,
            metrics=metrics,
            storage=storage_location(settings["storage"]),
            study_name=study_name,
            n_trials=n_trials,
            n_jobs=_batch_size(settings["n_jobs"]),
            max_failure_rate=float(rate),
            params=dict(settings.get("params") or {}),
            heartbeat_interval=settings.get("heartbeat_interval"),
            grace_period=settings.get("grace_period"),
            max_retry=settings.get("max_retry"),
        )


@dataclass
class Tally:
    """How many trials of a study ended each way."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: int = 0
    running: int = 0
    waiting: int = 0

    @classmethod
    def of(cls, trials: list[optuna.trial.FrozenTrial]) -> Tally:
        tally = cls()
        for trial in trials:
            if trial.state == TrialState.COMPLETE:
                tally.complete += 1
            elif trial.state == TrialState.PRUNED:
                tally.pruned += 1
            elif trial.state == TrialState.FAIL and "error" in trial.user_attrs:
                tally.failed += 1
            elif trial.state == TrialState.FAIL:
                tally.interrupted += 1
            elif trial.state == TrialState.RUNNING:
                tally.running += 1
            elif trial.state == TrialState.WAITING:
                tally.waiting += 1
        return tally

    @property
    def counted(self) -> int:
        """The trials that use up n_trials (see the module docstring)."""
        return self.complete + self.pruned + self.failed + self.running

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


class OptunaSweep:
    """One invocation of the sweeper: open (or continue) the study, run trials to n_trials."""

    def __init__(self, sweeper: TbpttOptunaSweeper, arguments: list[str]) -> None:
        assert sweeper.config is not None and sweeper.launcher is not None
        self.sweeper = sweeper
        self.config = sweeper.config
        self.launcher = sweeper.launcher

        # Everything a user can get wrong is checked here, before a study or a trial exists.
        self.settings = Settings.from_config(
            sweeper.settings, self.config.get("optimized_metric", "val/loss")
        )
        self.space: SearchSpace = parse_search_space(self.settings.params, arguments)
        if not self.space.distributions:
            raise SweepConfigError(
                "the sweep has nothing to search: give hydra.sweeper.params a choice, range or "
                "interval (e.g. tbptt.k: choice(5,10,20)), or put one on the command line "
                "(tbptt.k=choice(5,10,20))."
            )
        self.pruner = make_pruner(self.settings.pruner, self.settings.pruner_options)
        make_sampler(self.settings.sampler, self.settings.seed, self.settings.sampler_options,
                     self.space.distributions)
        self.total = self.settings.n_trials
        if self.settings.sampler == "grid":
            size = math.prod(len(v) for v in grid_of(self.space.distributions).values())
            if size < self.total:
                log.info("The grid has %d points: the sweep runs at most %d trials, not "
                         "n_trials=%d.", size, size, self.total)
                self.total = size

        self.sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self.host = socket.gethostname()
        self.exhausted = False
        self.last_error: str | None = None
        self._told_waiting = False

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        # Under the lock: workers that start together on an empty database would each create
        # Optuna's tables, and all but one would fail.
        with study_lock(self.settings.storage, self.settings.study_name):
            study = self.open_study()
            self.release_orphans(study)

        tally = Tally.of(study.get_trials(deepcopy=False))
        where = f"study {self.settings.study_name!r} in {display_location(self.settings.storage)}"
        if tally.counted >= self.total:
            log.info("%s already has %d of n_trials=%d trials: nothing to run. Raise "
                     "hydra.sweeper.n_trials to run more.", where, tally.counted, self.total)
        elif tally.counted:
            log.info("Continuing %s: %d of n_trials=%d trials done, %d to run.", where,
                     tally.counted, self.total, self.total - tally.counted)
        else:
            log.info("Starting %s: %d trials, %d at a time.", where, self.total,
                     self.settings.n_jobs)

        try:
            while not self.exhausted:
                self.check_failures(study)
                trials = self.ask_batch(study)
                if not trials:
                    # Trials that other workers run may still die and need running again.
                    if not self.others_running(study):
                        break
                    time.sleep(self.settings.heartbeat_interval or 2)
                    continue
                try:
                    self.run_batch(study, trials)
                except BaseException as error:
                    # Ctrl-C, a killed worker, a launcher that broke: whichever of the batch's
                    # trials did not end, ended with the sweep.
                    for trial in trials:
                        self.interrupt(study, trial._trial_id, trial.number, error)
                    raise
            self.check_failures(study)
        finally:
            results = self.write_results(study)
        return results

    def ask_batch(self, study: optuna.Study) -> list[optuna.Trial]:
        """Count the study's trials, then ask for as many as the batch and n_trials allow.

        Counting and asking belong together: two workers of one study that interleave them
        can overshoot n_trials, so this is the one place to serialise across workers.
        """
        # Every worker of the study takes the same lock (see workers.py), so no two count at
        # once; trials of dead workers are failed first, and those queued again are asked
        # for first.
        with study_lock(self.settings.storage, self.settings.study_name):
            fail_stale_trials(study)
            self.release_orphans(study)
            tally = Tally.of(study.get_trials(deepcopy=False))
            room = min(self.settings.n_jobs, self.total - tally.counted)
            trials = []
            for _ in range(max(room, 0)):
                trial = study.ask(self.space.distributions)
                trial.set_user_attr("sweeper_host", self.host)
                trial.set_user_attr("sweeper_pid", os.getpid())
                trials.append(trial)
            # A first beat before the lock is released: no trial is ever RUNNING unbeaten.
            Heartbeat(study, [trial._trial_id for trial in trials]).beat()
        return trials

    def others_running(self, study: optuna.Study) -> bool:
        """Whether trials of other workers still run that this worker may have to run again.

        With heartbeats, any RUNNING trial (its worker may die on any host); without, only
        those of this host, whose dead workers `release_orphans` detects.
        """
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not heartbeats_on(study):
            running = [t for t in running if t.user_attrs.get("sweeper_host") == self.host]
        if running and not self._told_waiting:
            self._told_waiting = True
            log.info("n_trials are taken; waiting for %d trial(s) that other workers run, in "
                     "case one of them dies and its trial has to run again.", len(running))
        return bool(running)

    def run_batch(self, study: optuna.Study, trials: list[optuna.Trial]) -> None:
        jobs = []
        for trial in trials:
            overrides = self.job_overrides(trial)
            # A sampled combination that does not compose (an unknown group option) fails
            # its trial here rather than the whole batch in the launcher.
            try:
                self.sweeper.validate_batch_is_legal([overrides])
            except Exception as error:
                self.fail(study, trial, error)
                continue
            jobs.append((trial, overrides))
        if not jobs:
            return

        with Heartbeat(study, [trial._trial_id for trial, _ in jobs]):
            returns = self.launcher.launch(
                [overrides for _, overrides in jobs], initial_job_idx=jobs[0][0].number
            )
        for (trial, _), job in zip(jobs, returns, strict=True):
            self.tell(study, trial, job)

    def job_overrides(self, trial: optuna.Trial) -> list[str]:
        """The fixed overrides, the trial's sampled values, and where to find the trial."""
        sampled = [override_for(key, value) for key, value in trial.params.items()]
        where = [
            f"hydra.sweeper.storage={quote_value(self.settings.storage)}",
            f"hydra.sweeper.study_name={quote_value(self.settings.study_name)}",
            f"hydra.sweeper.trial.id={trial._trial_id}",
            f"hydra.sweeper.trial.number={trial.number}",
        ]
        subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir")
        if subdir == DEFAULT_SUBDIR:
            where.append(f"hydra.sweep.subdir={trial.number}")
        return [*self.space.fixed, *sampled, *where]

    # ---- the study ----------------------------------------------------------------------

    def open_study(self) -> optuna.Study:
        """Create the study, or load it and check that this command continues it."""
        settings = self.settings
        storage = open_storage(settings.storage, **heartbeat_storage_kwargs(
            settings.heartbeat_interval, settings.grace_period, settings.max_retry,
            on_stale=self.end_stale_run,
        ))
        existing = settings.study_name in optuna.get_all_study_names(storage)
        n_before = 0
        if existing:
            study_id = storage.get_study_id_from_name(settings.study_name)
            n_before = len(storage.get_all_trials(study_id, deepcopy=False))

        # A seeded sampler would replay the first session's samples on resume; shift the seed.
        seed = None if settings.seed is None else settings.seed + n_before
        sampler = make_sampler(settings.sampler, seed, settings.sampler_options,
                               self.space.distributions)
        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            pruner=self.pruner,
            study_name=settings.study_name,
            directions=settings.directions,
            load_if_exists=True,
        )
        definition = {
            "fixed_overrides": sorted(self.space.fixed),
            "search_space": {
                key: distribution_to_json(value) for key, value in self.space.distributions.items()
            },
        }
        if not study.user_attrs.get("fixed_overrides") and not study.user_attrs.get(
            "search_space"
        ):
            for key, value in definition.items():
                study.set_user_attr(key, value)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(settings.metrics)
        else:
            self.check_continues(study, definition)
        return study

    def check_continues(self, study: optuna.Study, definition: dict[str, Any]) -> None:
        where = f"study {self.settings.study_name!r} in {display_location(self.settings.storage)}"
        directions = [d.name.lower() for d in study.directions]
        if directions != self.settings.directions:
            raise SweepConfigError(
                f"{where} {_fresh_study_hint()} It optimises {directions}, but this command "
                f"asks for {self.settings.directions}."
            )
        before = study.user_attrs.get("fixed_overrides", [])
        now = definition["fixed_overrides"]
        if before != now:
            dropped = [item for item in before if item not in now]
            added = [item for item in now if item not in before]
            raise SweepConfigError(
                f"{where} {_fresh_study_hint()} Its trials ran with "
                f"{' '.join(dropped) or 'no other overrides'}, where this command has "
                f"{' '.join(added) or 'none of them'}."
            )
        before_space = study.user_attrs.get("search_space") or {}
        for key, distribution in self.space.distributions.items():
            if key not in before_space:
                continue
            # Optuna lets a range widen or narrow within a study, but not a choice change.
            previous = json_to_distribution(before_space[key])
            try:
                check_distribution_compatibility(previous, distribution)
            except ValueError as error:
                raise SweepConfigError(
                    f"{where} {_fresh_study_hint()} Its trials sampled {key} from {previous}; "
                    f"this command asks for {distribution}, which Optuna cannot mix: {error}"
                ) from None
        if before_space != definition["search_space"]:
            log.warning("The search space differs from the one %s started with; its earlier "
                        "trials still count. Before: %s", where, before_space)

    def end_stale_run(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                      why: str = "its worker stopped beating (died?)") -> None:
        """End the MLflow run of a trial whose worker died: it would show RUNNING for ever."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            return
        from src import tracking

        uri = tracking.resolve_tracking_uri(self.config.logger.get("tracking_uri"), Path.cwd())
        client = tracking.client_for(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "trial.state", "FAIL")
            client.set_tag(run_id, "trial.error", why)
            client.set_terminated(run_id, "KILLED")

    def release_orphans(self, study: optuna.Study) -> None:
        """Fail RUNNING trials whose sweep process on this host is gone (a killed sweep).

        Not on a storage with heartbeats: there a dead worker's trial goes stale on any host
        alike, and is run again with the same parameters (see workers.py).
        """
        if heartbeats_on(study):
            return
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = trial.user_attrs.get("sweeper_pid")
            if trial.user_attrs.get("sweeper_host") == self.host and not _alive(pid):
                why = f"its sweep (process {pid}) ended while it ran"
                self.interrupt(study, trial._trial_id, trial.number, why)
                # Killed outright (kill -9), the job could not end its MLflow run: end it here,
                # or it shows RUNNING for ever and the sweep's parent run waits on it.
                self.end_stale_run(study, trial, why)

    # ---- how trials end -----------------------------------------------------------------

    def tell(self, study: optuna.Study, trial: optuna.Trial, job: JobReturn) -> None:
        if job.status != JobStatus.COMPLETED:
            # Read directly: `job.return_value` would re-raise and print Hydra's error banner.
            error = job._return_value
            if isinstance(error, optuna.TrialPruned):
                self._tell(study, trial, state=TrialState.PRUNED)
                log.info("Trial %d pruned: %s", trial.number, error)
            else:
                self.fail(study, trial, error)
            return

        value = job.return_value
        values = list(value) if isinstance(value, list | tuple) else [value]
        if len(values) != len(self.settings.directions):
            self.fail(study, trial, ValueError(
                f"the job returned {len(values)} value(s) for {len(self.settings.directions)} "
                f"direction(s): {value!r}"))
            return
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            self.fail(study, trial, TypeError(f"the job returned {value!r}, not numbers"))
            return
        if not all(math.isfinite(v) for v in values):
            self.fail(study, trial, ValueError(
                f"the objective {', '.join(self.settings.metrics)} is {values}, not finite"))
            return
        self._tell(study, trial, values=values)
        shown = ", ".join(f"{name} = {v:.6g}" for name, v in zip(
            self.settings.metrics, values, strict=True))
        log.info("Trial %d finished: %s", trial.number, shown)

    def fail(self, study: optuna.Study, trial: optuna.Trial, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}".strip()
        self.last_error = f"trial {trial.number}: {message}"
        try:
            trial.set_user_attr("error", message[:2000])
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker failed it first (its heart seemed to stop): the study has it.
            log.warning("Trial %d failed after another worker had failed it: %s",
                        trial.number, message)
            return
        self._tell(study, trial, state=TrialState.FAIL)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" and error.__traceback__ is not None:
            message += "\n" + "".join(traceback.format_exception(error))
        log.warning("Trial %d failed: %s", trial.number, message)

    def interrupt(self, study: optuna.Study, trial_id: int, number: int, why: Any) -> None:
        """Fail a trial that its sweep cut off; it does not count, and a rerun replaces it."""
        reason = f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else str(why)
        try:
            if study._storage.get_trial(trial_id).state.is_finished():
                return
            study._storage.set_trial_user_attr(trial_id, "interrupted", reason or "interrupted")
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        except Exception as error:  # the storage may be what failed; the sweep ends anyway
            log.warning("Could not mark trial %d as interrupted: %s", number, error)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, **result: Any) -> None:
        try:
            # skip_if_finished: another worker may have failed it as stale meanwhile.
            study.tell(trial, **result, skip_if_finished=True)
        except RuntimeError as error:
            # The grid and brute-force samplers call study.stop() once every point has run;
            # outside study.optimize that raises, after the result has been stored.
            if "stop" not in str(error):
                raise
            self.exhausted = True

    def check_failures(self, study: optuna.Study) -> None:
        tally = Tally.of(study.get_trials(deepcopy=False))
        allowed = self.settings.max_failure_rate * self.settings.n_trials
        if tally.failed <= allowed:
            return
        last = f" The last: {self.last_error}." if self.last_error else ""
        raise SweepStopped(
            f"Stopping the sweep: {tally.failed} of {tally.finished} finished trials failed, "
            f"more than max_failure_rate={self.settings.max_failure_rate} of "
            f"n_trials={self.settings.n_trials} allows ({math.floor(allowed)}).{last} Each "
            f"failed trial's error is its user attr 'error'; see "
            f"{self.sweep_dir / RESULTS_FILE}."
        )

    # ---- results ------------------------------------------------------------------------

    def write_results(self, study: optuna.Study) -> dict[str, Any]:
        trials = study.get_trials(deepcopy=False)
        tally = Tally.of(trials)
        results: dict[str, Any] = {
            "study_name": self.settings.study_name,
            "storage": display_location(self.settings.storage),
            "metrics": self.settings.metrics,
            "directions": self.settings.directions,
            "n_trials": self.settings.n_trials,
            "trials": {
                "complete": tally.complete,
                "pruned": tally.pruned,
                "failed": tally.failed,
                "interrupted": tally.interrupted,
                "running": tally.running,
            },
        }
        complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
        if len(self.settings.directions) == 1:
            best = study.best_trial if complete else None
            results |= {
                "best_trial": best.number if best else None,
                "best_value": best.value if best else None,
                "best_params": dict(best.params) if best else None,
                "best_overrides": self.command_line(best.params) if best else None,
            }
            if best:
                log.info("Best: trial %d, %s = %.6g. To run it alone:\n  python -m src.train %s",
                         best.number, self.settings.metrics[0], best.value,
                         results["best_overrides"])
        else:
            front = sorted(study.best_trials, key=lambda trial: trial.number) if complete else []
            results["pareto_front"] = [
                {
                    "trial": trial.number,
                    "values": dict(zip(self.settings.metrics, trial.values, strict=True)),
                    "params": dict(trial.params),
                    "overrides": self.command_line(trial.params),
                }
                for trial in front
            ]
            log.info("Pareto front of %s: trials %s", ", ".join(self.settings.metrics),
                     ", ".join(str(trial.number) for trial in front) or "none yet")
        if not complete:
            log.warning("No trial of the study has completed yet.")

        path = self.sweep_dir / RESULTS_FILE
        # width: the overrides stay one line, to copy as they are.
        path.write_text(yaml.safe_dump(results, sort_keys=False, width=1 << 16))
        log.info("Results: %s", path)
        return results

    def command_line(self, params: dict[str, Any]) -> str:
        """Overrides to paste after `python -m src.train` to run a trial on its own."""
        overrides = [*self.space.fixed, *(override_for(k, v) for k, v in params.items())]
        return " ".join(shlex.quote(override) for override in overrides)


def _metric_names(optimized_metric: Any) -> list[str]:
    if isinstance(optimized_metric, ListConfig | list | tuple):
        return [str(name) for name in optimized_metric]
    return [str(optimized_metric)]


def _directions(direction: Any, metrics: list[str]) -> list[str]:
    directions = [direction] if isinstance(direction, str) else list(direction)
    for value in directions:
        if value not in DIRECTIONS:
            raise SweepConfigError(
                f"hydra.sweeper.direction must be minimize or maximize (or a list of them), "
                f"but got {value!r}."
            )
    if len(directions) == 1 and len(metrics) > 1:
        return directions * len(metrics)
    if len(directions) != len(metrics):
        raise SweepConfigError(
            f"hydra.sweeper.direction has {len(directions)} entries ({directions}) but "
            f"optimized_metric names {len(metrics)} metrics ({metrics}); give one direction "
            f"per metric."
        )
    return directions


def _batch_size(n_jobs: Any) -> int:
    if not _is_int(n_jobs):
        raise SweepConfigError(f"hydra.sweeper.n_jobs must be an integer, but got {n_jobs!r}.")
    if n_jobs > 0:
        return n_jobs
    # As in joblib: -1 is every core, -2 all but one.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) + 1 + n_jobs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _alive(pid: Any) -> bool:
    if not _is_int(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fresh_study_hint() -> str:
    return ("was started by a different command. To start a new study, give it another "
            "hydra.sweeper.study_name (or another hydra.sweep.dir).")
