"""An Optuna sweeper for Hydra on Optuna's ask/tell API: pruning, resume, failure tolerance.

Select it with `hydra/sweeper: tbptt_optuna` (the sweep definitions in `sweeps/` do). Hydra
imports every public module of this package at start-up, so none of them imports Optuna at
module level; the sweep loop lives in `_sweep.py`, which Hydra skips.
"""
