"""Hydra's override grammar to Optuna distributions: a pure translation, nothing launched.

    choice(5,10,20) or 5,10,20       -> CategoricalDistribution([5, 10, 20])
    range(4,64) / range(4,64,4)      -> IntDistribution(4, 63) / IntDistribution(4, 60, step=4)
    interval(1e-4,1e-1)              -> FloatDistribution(1e-4, 1e-1)
    tag(log, interval(1e-4,1e-1))    -> FloatDistribution(1e-4, 1e-1, log=True)
    tag(int, interval(4,64))         -> IntDistribution(4, 64)
    0.5                              -> a fixed value, passed to every trial as typed

`range` stops before its end, as in Python and in Hydra's own sweeper; `interval` includes
both ends. Optuna is imported inside the functions: Hydra imports this module at start-up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    ValueType,
)
from hydra.errors import HydraException

from hydra_plugins.tbptt_optuna_sweeper._errors import SearchSpaceError

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

TAGS = ("log", "int")
# A string that Hydra's grammar reads back as the same string without quotes.
BARE_STRING = re.compile(r"[A-Za-z_][\w./-]*")
RESERVED = {"true", "false", "null", "inf", "nan"}


class SearchSpace(NamedTuple):
    """What the sweeper samples, and the overrides every trial gets unchanged.

    (Not a dataclass: Hydra executes this module before it is in sys.modules, where
    dataclasses cannot resolve string annotations.)
    """

    distributions: dict[str, BaseDistribution]
    fixed: list[str]


def parse_search_space(params: Mapping[str, Any], arguments: Sequence[str] = ()) -> SearchSpace:
    """The search space of `hydra.sweeper.params` joined with the command-line overrides.

    A command-line sweep (`tbptt.k=choice(4,8)`) replaces the entry of the same key in
    `params`; a plain command-line value (`tbptt.k=4`) fixes the key for every trial.
    """
    space = SearchSpace({}, [])
    entries = [(f"hydra.sweeper.params.{key}", f"{key}={format_value(value)}")
               for key, value in params.items()]
    entries += [(f"the command-line override {arg!r}", arg) for arg in arguments]

    chosen: dict[str, BaseDistribution | str] = {}
    for where, line in entries:
        override = parse_override(where, line)
        key = override.get_key_element()
        chosen.pop(key, None)  # a later entry wins, and takes its place at the end
        if override.is_sweep_override():
            chosen[key] = to_distribution(where, override)
        else:
            chosen[key] = line

    for key, value in chosen.items():
        if isinstance(value, str):
            space.fixed.append(value)
        else:
            space.distributions[key] = value
    return space


def parse_override(where: str, line: str) -> Override:
    try:
        return OverridesParser.create().parse_overrides([line])[0]
    except HydraException as error:
        reason = str(error).strip().splitlines()
        detail = reason[1] if len(reason) > 1 else reason[0] if reason else ""
        raise SearchSpaceError(f"{where}: cannot parse {line!r}: {detail}") from None


def to_distribution(where: str, override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (choice, range or interval)."""
    sweep = override.value()
    tags = set(getattr(sweep, "tags", ()) or ())
    unknown = tags - set(TAGS)
    if unknown:
        raise SearchSpaceError(
            f"{where}: unknown tag {', '.join(sorted(unknown))}; the tags are "
            f"{', '.join(TAGS)}, as in tag(log, interval(1e-4, 1e-1))."
        )
    if isinstance(sweep, ChoiceSweep):
        return _categorical(where, sweep, tags)
    if isinstance(sweep, RangeSweep):
        return _range(where, sweep, tags)
    if isinstance(sweep, IntervalSweep):
        return _interval(where, sweep, tags)
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        raise SearchSpaceError(
            f"{where}: glob(...) lists config-group options, which Optuna cannot sample; "
            f"name them with choice(...)."
        )
    raise SearchSpaceError(f"{where}: {override.input_line!r} is not a choice, range or interval.")


def _categorical(where: str, sweep: ChoiceSweep, tags: set[str]) -> BaseDistribution:
    from optuna.distributions import CategoricalDistribution

    if tags:
        raise SearchSpaceError(
            f"{where}: tag({', '.join(sorted(tags))}, ...) applies to range and interval, "
            f"not to a choice."
        )
    choices = [Override._convert_value(element) for element in sweep.list]
    for choice in choices:
        if choice is not None and not isinstance(choice, bool | int | float | str):
            raise SearchSpaceError(
                f"{where}: a choice must be of numbers, strings, booleans or null, "
                f"but got {choice!r}."
            )
    if not choices:
        raise SearchSpaceError(f"{where}: choice() is empty; give at least one value.")
    return CategoricalDistribution(list(dict.fromkeys(choices)))


def _range(where: str, sweep: RangeSweep, tags: set[str]) -> BaseDistribution:
    from optuna.distributions import FloatDistribution, IntDistribution

    start, stop, step = sweep.start, sweep.stop, sweep.step
    text = f"range({start}, {stop}, {step})"
    if not step or step <= 0:
        raise SearchSpaceError(f"{where}: {text} must have a positive step, but got {step}.")
    values = list(sweep.range())
    if not values:
        raise SearchSpaceError(
            f"{where}: {text} is empty; it must have start < stop (the stop is excluded)."
        )
    log = "log" in tags
    if log and values[0] <= 0:
        raise SearchSpaceError(f"{where}: tag(log, {text}) needs start > 0, but got {start}.")
    if log and step != 1:
        raise SearchSpaceError(
            f"{where}: tag(log, {text}) samples every value on a log scale and cannot have a "
            f"step; got step {step}."
        )
    if all(isinstance(value, int) for value in (start, stop, step)):
        return IntDistribution(int(values[0]), int(values[-1]), log=log, step=int(step))
    return FloatDistribution(float(values[0]), float(values[-1]), step=float(step))


def _interval(where: str, sweep: IntervalSweep, tags: set[str]) -> BaseDistribution:
    from optuna.distributions import FloatDistribution, IntDistribution

    low, high = float(sweep.start), float(sweep.end)
    text = f"interval({sweep.start}, {sweep.end})"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise SearchSpaceError(f"{where}: {text} must have finite ends.")
    if not low < high:
        raise SearchSpaceError(
            f"{where}: {text} must have low < high, but got low={sweep.start} and "
            f"high={sweep.end}; write interval({sweep.end}, {sweep.start})."
            if low > high
            else f"{where}: {text} is a single value; write it as a fixed value instead."
        )
    log = "log" in tags
    if log and low <= 0:
        raise SearchSpaceError(
            f"{where}: tag(log, {text}) needs low > 0 (a log scale has no zero), "
            f"but got {sweep.start}."
        )
    if "int" in tags:
        int_low, int_high = math.ceil(low), math.floor(high)
        if int_low > int_high:
            raise SearchSpaceError(f"{where}: tag(int, {text}) holds no integer.")
        return IntDistribution(int_low, int_high, log=log)
    return FloatDistribution(low, high, log=log)


def format_value(value: Any) -> str:
    """A config value as Hydra's override grammar writes it: `null`, `true`, `'a b'`, `3`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def quote_value(value: Any) -> str:
    """A trial's value as an override value that Hydra reads back unchanged."""
    if isinstance(value, str):
        if BARE_STRING.fullmatch(value) and value.lower() not in RESERVED:
            return value
        # Hydra reads a backslash as an escape only before a quote or at the end.
        escaped = re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'")
        return f"'{escaped}'"
    return format_value(value)


def override_for(key: str, value: Any) -> str:
    """The override that gives `key` the sampled `value`: `tbptt.k=8`."""
    return f"{key}={quote_value(value)}"
