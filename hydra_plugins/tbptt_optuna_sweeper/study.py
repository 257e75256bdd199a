"""Storages, samplers, pruners and studies, built from the sweeper's config.

Shared by the sweeper, by the jobs it launches (which reach their trial through the storage and
need the same pruner, since a study does not store its pruner) and by anything that reads a
sweep's study afterwards:

    from hydra_plugins.tbptt_optuna_sweeper.study import load_study
    study = load_study(cfg.hydra.sweeper.storage, cfg.hydra.sweeper.study_name)

Optuna is imported inside the functions: Hydra imports this module at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra_plugins.tbptt_optuna_sweeper._errors import SweepConfigError
from hydra_plugins.tbptt_optuna_sweeper.config import PRUNERS, SAMPLERS

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)

# Each ignored option is said once, though the sweeper builds its sampler more than once.
_warned: set[tuple[str, str, str]] = set()


def is_database_url(storage: str) -> bool:
    return "://" in storage


def storage_location(storage: str | None, cwd: str | Path | None = None) -> str:
    """`storage` with relative paths made absolute, so that every process finds the same file.

    A journal file is a path; `sqlite:///relative.db` becomes `sqlite:////abs/relative.db`;
    other database URLs are returned unchanged.
    """
    if storage is None or not str(storage).strip():
        raise SweepConfigError(
            "hydra.sweeper.storage must name a journal file (e.g. multirun/k_lr/optuna.journal) "
            "or a database URL (sqlite:///optuna.db, postgresql://...), but got "
            f"{storage!r}: the jobs reach their trials through it."
        )
    storage = str(storage)
    base = Path(cwd) if cwd is not None else Path.cwd()
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        path = storage.removeprefix("sqlite:///")
        if path and path != ":memory:":
            return f"sqlite:///{(base / path).resolve()}"
        return storage
    if is_database_url(storage):
        return storage
    return str((base / Path(storage).expanduser()).resolve())


def display_location(storage: str) -> str:
    """`storage` with its password hidden, for logs and result files."""
    from urllib.parse import urlsplit, urlunsplit

    if not is_database_url(storage):
        return storage
    parts = urlsplit(storage)
    if parts.password is None:
        return storage
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_storage(storage: str, **rdb_kwargs: Any) -> optuna.storages.BaseStorage:
    """A journal file (any path) or a database (any SQLAlchemy URL) as an Optuna storage.

    `rdb_kwargs` go to `RDBStorage` (heartbeats: see workers.py); a journal takes none.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    location = storage_location(storage)
    if is_database_url(location):
        return optuna.storages.RDBStorage(location, **rdb_kwargs)
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(location))


def load_study(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """An existing study, for reading or for a job that reports to its trial."""
    import optuna

    if isinstance(storage, str):
        storage = open_storage(storage)
    # The sampler of a loaded study only matters to `ask`, which jobs never call; a random
    # sampler makes loading cheap whatever the sweep samples with.
    return optuna.load_study(
        study_name=study_name,
        storage=storage,
        pruner=pruner,
        sampler=optuna.samplers.RandomSampler(),
    )


def make_pruner(name: Any, options: Mapping[str, Any] | None = None) -> optuna.pruners.BasePruner:
    """The pruner called `name` (one of PRUNERS), built with `options`."""
    import optuna

    options = dict(options or {})
    classes = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }
    if name not in classes:
        raise SweepConfigError(
            f"hydra.sweeper.pruner must be one of {', '.join(PRUNERS)}, but got {name!r}."
        )
    if name == "none":
        # The options a sweep file gives its pruner must not stop `pruner=none` from working.
        return optuna.pruners.NopPruner()
    if name == "percentile":
        # Optuna has no default; 25 prunes a trial worse than three quarters of the others.
        options.setdefault("percentile", 25.0)
    return _build("hydra.sweeper.pruner_options", f"pruner {name}", classes[name], options,
                  classes)


def make_sampler(
    name: Any,
    seed: int | None,
    options: Mapping[str, Any] | None = None,
    distributions: Mapping[str, BaseDistribution] | None = None,
) -> optuna.samplers.BaseSampler:
    """The sampler called `name` (one of SAMPLERS), seeded, built with `options`."""
    import optuna

    options = dict(options or {})
    classes = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "grid": optuna.samplers.GridSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
        "qmc": optuna.samplers.QMCSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "nsga3": optuna.samplers.NSGAIIISampler,
        "bruteforce": optuna.samplers.BruteForceSampler,
    }
    if name not in classes:
        raise SweepConfigError(
            f"hydra.sweeper.sampler must be one of {', '.join(SAMPLERS)}, but got {name!r}."
        )
    if name == "grid":
        options.setdefault("search_space", grid_of(distributions or {}))
    if name == "cmaes":
        _require_module("cmaes", "sampler=cmaes")
    if name in ("gp", "qmc"):
        _require_module("scipy", f"sampler={name}")
    return _build("hydra.sweeper.sampler_options", f"sampler {name}", classes[name],
                  {"seed": seed, **options}, classes)


def grid_of(distributions: Mapping[str, BaseDistribution]) -> dict[str, list[Any]]:
    """Every value of each distribution, for the grid sampler; intervals have no grid."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    grid: dict[str, list[Any]] = {}
    for key, distribution in distributions.items():
        if isinstance(distribution, CategoricalDistribution):
            grid[key] = list(distribution.choices)
        elif isinstance(distribution, IntDistribution) and not distribution.log:
            grid[key] = list(range(distribution.low, distribution.high + 1, distribution.step))
        elif getattr(distribution, "step", None) is not None and not distribution.log:
            count = round((distribution.high - distribution.low) / distribution.step) + 1
            grid[key] = [distribution.low + i * distribution.step for i in range(count)]
        else:
            raise SweepConfigError(
                f"hydra.sweeper.params.{key}: sampler=grid needs a choice or a range, but "
                f"{key} is a continuous {distribution}; use choice(...) or range(...), or "
                f"another sampler."
            )
    return grid


def _build(
    options_key: str, what: str, cls: type, options: dict[str, Any], family: dict[str, type]
) -> Any:
    import warnings

    import optuna

    options = _options_for(options_key, what, cls, options, family)
    try:
        # Several samplers are marked experimental; the user chose one by name already.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**options)
    except (TypeError, ValueError) as error:
        raise SweepConfigError(f"{options_key}: the {what} rejects {options}: {error}") from None


def _options_for(
    options_key: str, what: str, cls: type, options: dict[str, Any], family: dict[str, type]
) -> dict[str, Any]:
    """`options` that `cls` takes. An option of another sampler (pruner) is dropped with a
    warning, so that `sampler=grid` works with a sweep file written for tpe; a name that
    none takes is a typo, and an error."""
    import inspect

    def takes(kind: type) -> set[str]:
        return set(inspect.signature(kind).parameters)

    accepted = takes(cls)
    kept = {}
    for key, value in options.items():
        if key in accepted:
            kept[key] = value
            continue
        owners = [name for name, other in family.items() if key in takes(other)]
        if not owners:
            raise SweepConfigError(
                f"{options_key}.{key}: no such option; the {what} takes "
                f"{', '.join(sorted(accepted - {'seed', 'search_space'})) or 'none'}."
            )
        if (options_key, key, what) not in _warned:
            _warned.add((options_key, key, what))
            log.warning("%s.%s is an option of %s, not of the %s: ignored.", options_key, key,
                        " and ".join(owners), what)
    return kept


def _require_module(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SweepConfigError(
            f"{what} needs the Python package {module!r}, which is not installed; "
            f"pip install {module}."
        )
