"""The sweeper's config, registered with Hydra as `hydra/sweeper: tbptt_optuna`."""

# No `from __future__ import annotations` here: Hydra executes this module before it is in
# sys.modules, where dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2", "nsga3", "bruteforce")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")

# The study file lives in the sweep folder, so that running the same sweep again (same
# hydra.sweep.dir) continues the same study.
DEFAULT_STORAGE = "${hydra.sweep.dir}/optuna.journal"


@dataclass
class TrialRef:
    """Which Optuna trial a job is: the sweeper sets this for each job it launches."""

    id: int | None = None
    number: int | None = None


@dataclass
class TbpttOptunaSweeperConf:
    _target_: str = "hydra_plugins.tbptt_optuna_sweeper.sweeper.TbpttOptunaSweeper"

    # One of SAMPLERS; `seed` makes the sequence of trials repeatable. `sampler_options` are
    # passed to the Optuna sampler, e.g. {n_startup_trials: 5} for tpe.
    sampler: str = "tpe"
    seed: int | None = 0
    sampler_options: dict[str, Any] = field(default_factory=dict)

    # One of PRUNERS; `pruner_options` are passed to the Optuna pruner, e.g.
    # {n_startup_trials: 3, n_warmup_steps: 1} for median.
    pruner: str = "median"
    pruner_options: dict[str, Any] = field(default_factory=dict)

    # minimize or maximize, or one of them per entry of `optimized_metric`. `directions` is
    # the same setting under the name Optuna uses for several objectives; it wins when set.
    direction: Any = "minimize"
    directions: list[str] | None = None

    # A journal file (a path) or a database URL (sqlite:///..., postgresql://...).
    storage: str | None = DEFAULT_STORAGE
    study_name: str = "tbptt"

    # Database storages: each worker beats the heart of its running trials every
    # heartbeat_interval seconds; a trial silent for grace_period seconds (its worker died) is
    # failed and run again, at most max_retry times. null turns heartbeats off.
    heartbeat_interval: int | None = 10
    grace_period: int | None = 60
    max_retry: int | None = 3

    # The total for the study, counting trials that ran in earlier invocations.
    n_trials: int = 20
    # Trials launched together; follows the launcher's n_jobs (1 for the in-process one).
    n_jobs: Any = "${oc.select:hydra.launcher.n_jobs,1}"
    # The sweep stops once failed trials exceed this fraction of n_trials.
    max_failure_rate: float = 0.25

    # The search space in Hydra's override grammar, e.g. {tbptt.k: "choice(5,10,20)"}.
    params: dict[str, Any] = field(default_factory=dict)

    trial: TrialRef = field(default_factory=TrialRef)


ConfigStore.instance().store(
    group="hydra/sweeper", name="tbptt_optuna", node=TbpttOptunaSweeperConf, provider="tbptt-lab"
)
