"""The Hydra plugin class; the sweep itself is in `_sweep.py`, imported when a sweep starts."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# Registers `hydra/sweeper: tbptt_optuna` with Hydra's ConfigStore.
from hydra_plugins.tbptt_optuna_sweeper import config as _config  # noqa: F401


class TbpttOptunaSweeper(Sweeper):
    """Samples trials with Optuna, launches them through Hydra's launcher, tells the results."""

    def __init__(self, **settings: Any) -> None:
        # The fields of TbpttOptunaSweeperConf, resolved by Hydra.
        self.settings = settings
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from hydra_plugins.tbptt_optuna_sweeper._sweep import OptunaSweep

        return OptunaSweep(self, arguments).run()
