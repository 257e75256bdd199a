"""Check the config of every job of a multirun before the first job starts.

Hydra's grid sweeper runs the jobs one after another and reports a failed job only when the
whole batch is done, so `-m tbptt.k=5,0,20` would train k=5, fail k=0 and train k=20 before
saying anything. `CheckEveryJob` (a Hydra callback, registered first under `hydra.callbacks`
in conf/train.yaml) composes each job's config as the launcher will and runs `validate` on
it, so that one bad value stops the sweep before any job, MLflow run or Optuna trial exists.

Values that a sweeper samples (Optuna's `interval(...)`, or ranges in its search space) give
no list of jobs to check. For the Optuna sweeper, its own checks of its settings and search
space run here too (`check_optuna_sweep`), before its MLflow parent run or study exists; each
trial's config is checked again when the trial starts.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from types import SimpleNamespace
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, validate
from src.tracking import mask_override

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
OPTUNA_SWEEPER = "hydra_plugins.tbptt_optuna_sweeper.sweeper.TbpttOptunaSweeper"

# Composing a job's config takes about 0.1 s; a larger grid is checked one value at a time.
MAX_CHECKED_JOBS = 200


class CheckEveryJob(Callback):
    """Stops a multirun at once, with exit status 2, if any job's config cannot train."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.errors import HydraException

        try:
            check_optuna_sweep(config)
            n_checked = check_jobs(config, kwargs.get("config_name") or "train")
        except (ConfigError, HydraException) as error:
            print(f"error: {error}\nNo job of this multirun was started.", file=sys.stderr)
            sys.exit(2)
        log.debug("checked the configs of %d jobs", n_checked)


def sweep_choices(config: DictConfig) -> dict[str, list[str]]:
    """Each key's overrides across the jobs of a multirun, as far as they can be listed.

    The grid sweeper's jobs are every combination of its `params` and the command line's
    sweeps. For another sweeper, each listed choice is a job's value and a sampled range is
    left out (its values are known only when the sweeper draws them).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    arguments = []
    if sweeper.get("_target_") == BASIC_SWEEPER and sweeper.get("params"):
        arguments += [f"{key}={value}" for key, value in sweeper.params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))

    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices.pop(key, None)
    return choices


def jobs_to_check(choices: dict[str, list[str]]) -> list[tuple[int, list[str]]]:
    """(job number, overrides) of every job, or for a large grid of one job per value.

    Jobs are numbered as Hydra numbers them: the last key varies fastest.
    """
    values = list(choices.values())
    sizes = [len(options) for options in values]
    if math.prod(sizes) <= MAX_CHECKED_JOBS:
        return [(number, list(job)) for number, job in enumerate(itertools.product(*values))]

    # Too many to compose one by one: every value of every key once, the others at their
    # first value. A bad value is still found; a bad pairing of two values may not be.
    picked: dict[int, list[str]] = {}
    for position, size in enumerate(sizes):
        for choice in range(size):
            index = [0] * len(sizes)
            index[position] = choice
            number = sum(i * math.prod(sizes[k + 1 :]) for k, i in enumerate(index))
            picked[number] = [options[i] for options, i in zip(values, index, strict=True)]
    return sorted(picked.items())


def check_optuna_sweep(config: DictConfig) -> None:
    """Raise the Optuna sweeper's own error for a setting or search space that cannot work.

    The sweeper checks these when it starts, but Hydra starts it after the callbacks' own
    start, when the sweep's MLflow parent run already exists; checking here creates nothing.
    """
    if config.hydra.sweeper.get("_target_") != OPTUNA_SWEEPER:
        return
    from hydra_plugins.tbptt_optuna_sweeper._sweep import OptunaSweep

    settings = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
    settings.pop("_target_", None)
    arguments = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    # Making an OptunaSweep checks every setting and the search space, and opens nothing.
    sweeper = SimpleNamespace(settings=settings, config=config, launcher=object())
    OptunaSweep(sweeper, arguments)


def check_jobs(config: DictConfig, config_name: str) -> int:
    """Compose and validate each job's config; raise `ConfigError` naming the first bad job."""
    from hydra import compose

    jobs = jobs_to_check(sweep_choices(config))
    # Hydra's own overrides too: `hydra.searchpath` can decide where a config group is found.
    hydra_overrides = list(OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False))
    for number, overrides in jobs:
        job_cfg = compose(config_name, overrides=[*hydra_overrides, *overrides])
        try:
            validate(job_cfg)
        except ConfigError as error:
            shown = " ".join(map(mask_override, overrides))
            raise ConfigError(f"job #{number} ({shown}): {error}") from None
    return len(jobs)
