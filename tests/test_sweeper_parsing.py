"""The sweeper's pure parts: Hydra's override grammar to Optuna distributions, and its settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.tbptt_optuna_sweeper._sweep import OptunaSweep, Settings, SweepStopped, Tally
from hydra_plugins.tbptt_optuna_sweeper.search_space import (
    SearchSpaceError,
    override_for,
    parse_search_space,
)
from hydra_plugins.tbptt_optuna_sweeper.study import (
    SweepConfigError,
    display_location,
    grid_of,
    make_pruner,
    make_sampler,
    storage_location,
)

PARSED = [
    # (value in hydra.sweeper.params, distribution)
    ("choice(5,10,20)", CategoricalDistribution([5, 10, 20])),
    ("5,10,20", CategoricalDistribution([5, 10, 20])),
    ("choice(adam, sgd)", CategoricalDistribution(["adam", "sgd"])),
    ("choice('a b', 3, true)", CategoricalDistribution(["a b", 3, True])),
    ("choice(4,4,8)", CategoricalDistribution([4, 8])),
    ("range(4,64)", IntDistribution(4, 63)),
    ("range(4,64,4)", IntDistribution(4, 60, step=4)),
    ("range(4,65,4)", IntDistribution(4, 64, step=4)),
    ("tag(log, range(1,1025))", IntDistribution(1, 1024, log=True)),
    ("range(0.5,2.0,0.5)", FloatDistribution(0.5, 1.5, step=0.5)),
    ("interval(1e-4,1e-1)", FloatDistribution(1e-4, 1e-1)),
    ("interval(0,1)", FloatDistribution(0.0, 1.0)),
    ("tag(log, interval(1e-4, 1e-1))", FloatDistribution(1e-4, 1e-1, log=True)),
    ("tag(int, interval(4, 64))", IntDistribution(4, 64)),
    ("tag(int, interval(3.5, 64.5))", IntDistribution(4, 64)),
    ("tag(int, log, interval(1, 1000))", IntDistribution(1, 1000, log=True)),
    ("shuffle(choice(1,2))", CategoricalDistribution([1, 2])),
]


@pytest.mark.parametrize(("value", "expected"), PARSED)
def test_a_sweep_value_becomes_its_distribution(value, expected):
    space = parse_search_space({"key": value})
    assert space.distributions == {"key": expected}
    assert space.fixed == []


FIXED = [
    # (params, command line, fixed overrides every trial gets)
    ({"data.seq_len": 50}, [], ["data.seq_len=50"]),
    ({"optimizer.lr": 0.001}, [], ["optimizer.lr=0.001"]),
    ({"trainer.enable_progress_bar": False}, [], ["trainer.enable_progress_bar=false"]),
    ({"ckpt_path": None}, [], ["ckpt_path=null"]),
    ({"data": "adding"}, [], ["data=adding"]),
    ({}, ["sweep=k_lr", "+extra=1", "~ckpt_path"], ["sweep=k_lr", "+extra=1", "~ckpt_path"]),
    # A plain value on the command line fixes a key the params would sample.
    ({"tbptt.k": "choice(2,4)"}, ["tbptt.k=8"], ["tbptt.k=8"]),
]


@pytest.mark.parametrize(("params", "arguments", "fixed"), FIXED)
def test_a_plain_value_is_passed_to_every_trial_as_typed(params, arguments, fixed):
    space = parse_search_space(params, arguments)
    assert space.fixed == fixed
    # Each one reads back as a valid override.
    OverridesParser.create().parse_overrides(space.fixed)


def test_a_command_line_sweep_replaces_the_params_entry():
    space = parse_search_space(
        {"tbptt.k": "choice(2,4)", "optimizer.lr": "interval(1e-3, 1e-2)"},
        ["tbptt.k=choice(8,16)", "model.hidden_size=range(8,33,8)"],
    )
    assert space.distributions == {
        "optimizer.lr": FloatDistribution(1e-3, 1e-2),
        "tbptt.k": CategoricalDistribution([8, 16]),
        "model.hidden_size": IntDistribution(8, 32, step=8),
    }


REJECTED = [
    # (value, words the message must contain)
    ("choice()", ["hydra.sweeper.params.key", "empty choice"]),
    ("interval(1e-1,1e-4)", ["hydra.sweeper.params.key", "low < high", "interval(0.0001, 0.1)"]),
    ("interval(0.5,0.5)", ["single value"]),
    ("tag(log, interval(0, 1))", ["low > 0"]),
    ("tag(log, range(0, 10))", ["start > 0"]),
    ("tag(log, range(1, 100, 2))", ["step"]),
    ("range(10, 4)", ["empty", "start < stop"]),
    ("range(1, 10, -1)", ["positive step"]),
    ("tag(sqrt, interval(1, 2))", ["unknown tag sqrt", "log, int"]),
    ("tag(log, choice(1, 2))", ["range and interval"]),
    ("tag(int, interval(0.2, 0.8))", ["no integer"]),
    ("choice([1,2],[3])", ["numbers, strings"]),
    ("glob(*)", ["choice(...)"]),
    ("choice(1,", ["cannot parse"]),
]


@pytest.mark.parametrize(("value", "words"), REJECTED)
def test_a_search_space_that_cannot_work_is_rejected_naming_the_key(value, words):
    with pytest.raises(SearchSpaceError) as error:
        parse_search_space({"key": value})
    for word in words:
        assert word in str(error.value)


def test_a_bad_command_line_sweep_names_the_override():
    with pytest.raises(SearchSpaceError, match=r"command-line override 'tbptt.k=interval\(8,2\)'"):
        parse_search_space({}, ["tbptt.k=interval(8,2)"])


VALUES = ["adam", "a b", "it's", "5", "true", "null", "nan", "x,y", "f(x)", "C:\\dir\\", "",
          "/abs/path/optuna.journal", "postgresql://u:p@h:5432/db?sslmode=require",
          3, -2, 1e-5, 0.1, True, False, None]


@pytest.mark.parametrize("value", VALUES)
def test_a_sampled_value_reads_back_unchanged_as_an_override(value):
    override = OverridesParser.create().parse_overrides([override_for("key", value)])[0]
    assert override.value() == value
    assert type(override.value()) is type(value)


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2",
                                  "nsga3", "bruteforce"])
def test_every_sampler_builds_with_a_seed(name):
    distributions = {"k": CategoricalDistribution([2, 4]), "h": IntDistribution(8, 16, step=8)}
    if name not in ("grid", "bruteforce"):
        distributions["lr"] = FloatDistribution(1e-4, 1e-1, log=True)
    sampler = make_sampler(name, 3, {}, distributions)
    assert sampler is not None


@pytest.mark.parametrize("name", ["median", "percentile", "successive_halving", "hyperband",
                                  "none"])
def test_every_pruner_builds(name):
    assert make_pruner(name, {}) is not None


SETTING_ERRORS = [
    # (settings, words the message must contain)
    ({"sampler": "tpee"}, ["hydra.sweeper.sampler", "tpe, random, grid", "'tpee'"]),
    ({"pruner": "medain"}, ["hydra.sweeper.pruner", "median, percentile", "'medain'"]),
    ({"pruner_options": {"n_warmup": 1}},
     ["hydra.sweeper.pruner_options.n_warmup: no such option", "n_warmup_steps"]),
    ({"sampler_options": {"startup": 1}},
     ["hydra.sweeper.sampler_options.startup: no such option", "n_startup_trials"]),
    ({"direction": "minimise"}, ["hydra.sweeper.direction", "minimize or maximize"]),
    ({"direction": ["minimize", "minimize"]}, ["2 entries", "1 metrics"]),
    ({"n_trials": 0}, ["hydra.sweeper.n_trials", "positive integer"]),
    ({"max_failure_rate": 1.5}, ["hydra.sweeper.max_failure_rate", "from 0 to 1"]),
    ({"study_name": ""}, ["hydra.sweeper.study_name"]),
    ({"storage": None}, ["hydra.sweeper.storage", "journal file"]),
    ({"n_jobs": "two"}, ["hydra.sweeper.n_jobs", "integer"]),
]

DEFAULTS = {
    "sampler": "tpe", "seed": 0, "sampler_options": {}, "pruner": "median",
    "pruner_options": {}, "direction": "minimize", "directions": None,
    "storage": "optuna.journal", "study_name": "s", "n_trials": 4, "n_jobs": 1,
    "max_failure_rate": 0.25, "params": {},
}


@pytest.mark.parametrize(("settings", "words"), SETTING_ERRORS)
def test_a_setting_that_cannot_work_fails_naming_the_key(settings, words):
    with pytest.raises(SweepConfigError) as error:
        merged = DEFAULTS | settings
        checked = Settings.from_config(merged, "val/loss")
        make_sampler(checked.sampler, checked.seed, checked.sampler_options, {})
        make_pruner(checked.pruner, checked.pruner_options)
    for word in words:
        assert word in str(error.value)


def test_an_option_of_another_sampler_or_pruner_is_ignored_not_an_error():
    # A sweep file written for tpe and median still runs with sampler=grid, pruner=hyperband.
    grid = make_sampler("grid", 0, {"n_startup_trials": 6}, {"k": CategoricalDistribution([2])})
    assert type(grid).__name__ == "GridSampler"
    hyperband = make_pruner("hyperband", {"n_startup_trials": 4, "min_resource": 2})
    assert type(hyperband).__name__ == "HyperbandPruner"


def test_several_objectives_need_no_pruner_and_take_one_direction_each():
    metrics = ["val/loss", "perf/epoch_seconds"]
    with pytest.raises(SweepConfigError, match="pruner must be none"):
        Settings.from_config(DEFAULTS, metrics)
    settings = Settings.from_config(DEFAULTS | {"pruner": "none"}, metrics)
    # One direction given for two metrics applies to both.
    assert settings.directions == ["minimize", "minimize"]
    settings = Settings.from_config(
        DEFAULTS | {"pruner": "none", "directions": ["minimize", "maximize"]}, metrics
    )
    assert settings.directions == ["minimize", "maximize"]


def test_a_negative_n_jobs_counts_cores_as_joblib_does():
    assert Settings.from_config(DEFAULTS | {"n_jobs": -1}, "val/loss").n_jobs >= 1
    assert Settings.from_config(DEFAULTS | {"n_jobs": 3}, "val/loss").n_jobs == 3


def test_the_grid_of_a_search_space_lists_every_point():
    grid = grid_of({"k": CategoricalDistribution([2, 4]), "h": IntDistribution(8, 24, step=8)})
    assert grid == {"k": [2, 4], "h": [8, 16, 24]}
    with pytest.raises(SweepConfigError, match="sampler=grid needs a choice or a range"):
        grid_of({"lr": FloatDistribution(1e-4, 1e-1, log=True)})


STORAGES = [
    # (storage, cwd, where every process finds it)
    ("multirun/k_lr/optuna.journal", "/work", "/work/multirun/k_lr/optuna.journal"),
    ("/abs/optuna.journal", "/work", "/abs/optuna.journal"),
    ("sqlite:///optuna.db", "/work", "sqlite:////work/optuna.db"),
    ("sqlite:////abs/optuna.db", "/work", "sqlite:////abs/optuna.db"),
    ("postgresql://u:p@db:5432/optuna", "/work", "postgresql://u:p@db:5432/optuna"),
]


@pytest.mark.parametrize(("storage", "cwd", "expected"), STORAGES)
def test_a_storage_names_one_place_from_any_folder(storage, cwd, expected):
    assert storage_location(storage, cwd) == expected


def test_a_storage_password_is_not_shown():
    assert display_location("postgresql://u:secret@db:5432/optuna") == (
        "postgresql://u:***@db:5432/optuna"
    )


def test_trials_cut_off_by_their_sweep_do_not_count():
    import optuna
    from optuna.trial import TrialState, create_trial

    def trial(state, **attrs):
        values = [1.0] if state == TrialState.COMPLETE else None
        return create_trial(state=state, values=values, user_attrs=attrs)

    trials = [trial(TrialState.COMPLETE), trial(TrialState.PRUNED),
              trial(TrialState.FAIL, error="DivergenceError: nan"),
              trial(TrialState.FAIL, interrupted="KeyboardInterrupt"),
              trial(TrialState.RUNNING), trial(TrialState.WAITING)]
    tally = Tally.of(trials)
    assert (tally.complete, tally.pruned, tally.failed, tally.interrupted, tally.running,
            tally.waiting) == (1, 1, 1, 1, 1, 1)
    # Complete, pruned, failed by its own error, and running: four use up n_trials.
    assert tally.counted == 4
    assert optuna.trial.TrialState.FAIL.is_finished()


def test_the_sweep_stops_once_failures_pass_max_failure_rate_of_n_trials(tmp_path):
    import optuna
    from omegaconf import OmegaConf
    from optuna.trial import TrialState, create_trial

    config = OmegaConf.create({"optimized_metric": "val/loss",
                               "hydra": {"sweep": {"dir": str(tmp_path)}}})
    settings = DEFAULTS | {"params": {"k": "choice(1,2)"}, "max_failure_rate": 0.25}
    # A sweep that has opened nothing yet; only its failure check is used here.
    sweep = OptunaSweep(SimpleNamespace(settings=settings, config=config, launcher=object()), [])
    study = optuna.create_study()

    def add(state, **attrs):
        values = [1.0] if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, values=values, user_attrs=attrs))

    add(TrialState.COMPLETE)
    add(TrialState.FAIL, error="DivergenceError: inf")
    add(TrialState.FAIL, interrupted="KeyboardInterrupt")  # not the trial's own failure
    sweep.check_failures(study)  # one failure of n_trials=4 is within 0.25

    add(TrialState.FAIL, error="ConfigError: data.lag must be less than data.seq_len")
    with pytest.raises(SweepStopped) as stopped:
        sweep.check_failures(study)
    message = str(stopped.value)
    assert "Stopping the sweep: 2 of 3 finished trials failed" in message
    assert "max_failure_rate=0.25 of n_trials=4 allows (1)" in message


def test_errors_keep_their_class_when_hydra_scans_the_plugin_again():
    import importlib
    import importlib.util

    # Hydra's plugin scan executes each public module of the package again, in place.
    for name in ("search_space", "study", "config", "sweeper"):
        module = importlib.import_module(f"hydra_plugins.tbptt_optuna_sweeper.{name}")
        importlib.util.find_spec(module.__name__).loader.exec_module(module)
    with pytest.raises(SearchSpaceError):
        parse_search_space({"key": "interval(2,1)"})
    with pytest.raises(SweepConfigError):
        make_pruner("medain")
