"""The pictures of a sweep's report (src/report.py), drawn with matplotlib, headless.

Each function draws one PNG from a `SweepRecord` and returns None, or returns a note that
says why there is nothing to draw. A bare `Figure` renders with Agg and never touches pyplot's
global state or a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from src.report import K_PARAM, LR_PARAM, SweepRecord, _finite, _parse, pareto_front

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _figure(width: float = 7.0, height: float = 4.5) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _log_scale(values: list[float]) -> bool:
    """Whether values span enough of a range (all positive, a factor of 4 or more) for a log
    axis: truncation lengths and learning rates are swept in powers."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 4


def _k_axis(axes: Axes, ks: list[float]) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator, ScalarFormatter

    if _log_scale(ks):
        axes.set_xscale("log", base=2)
    distinct = sorted(set(ks))
    if len(distinct) <= 12:
        # Tick the values that were tried, written as numbers: 2, 4, 8, not 2^1, 2^2, 2^3.
        axes.set_xticks(distinct)
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel(f"{K_PARAM} (truncation length, time steps)")


def _lr_label(lr: object) -> str:
    return f"lr = {_short(lr)}"


def _short(value: object) -> str:
    parsed = _parse(value) if isinstance(value, str) else value
    return f"{parsed:.3g}" if isinstance(parsed, float) else str(parsed)


def objective_vs_k(record: SweepRecord, path: Path) -> str | None:
    """The first objective against k: a line per learning rate (through the mean where a
    value of k was tried more than once) when a few learning rates were each tried with
    several k, as in a grid; otherwise a scatter coloured by lr, as an Optuna sweep gives.
    Where lr was not swept but another key was (`tbptt.mode`, say), the lines follow that key.
    """
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    series_key = _series_key(record)
    points = [
        (_parse(t.params.get(K_PARAM, "")), _parse(t.params.get(series_key, "")), t.values[0])
        for t in record.trials if t.complete
    ]
    points = [(k, series, y) for k, series, y in points if _finite(k)]
    if not points:
        return f"No plot of the objective against k: no complete trial has a numeric {K_PARAM}."
    metric = record.objectives[0]
    figure = _figure()
    axes = figure.subplots()
    values = sorted({v for _, v, _ in points}, key=lambda value: (str(type(value)), value))
    per_value = [sum(v_ == v for _, v_, _ in points) for v in values]
    if len(values) == 1 or (len(values) <= 6 and min(per_value) >= 2):
        colours = colormaps["viridis"]
        for index, value in enumerate(values):
            group = [(k, y) for k, v_, y in points if v_ == value]
            ks = sorted({k for k, _ in group})
            means = [_mean([y for k_, y in group if k_ == k]) for k in ks]
            colour = colours(index / max(len(values) - 1, 1))
            label = _lr_label(value) if series_key == LR_PARAM else f"{series_key} = {value}"
            axes.scatter([k for k, _ in group], [y for _, y in group], color=colour, s=14)
            axes.plot(ks, means, marker="o", color=colour, label=label)
        axes.legend(fontsize="small")
    else:
        numeric = all(_finite(v) for v in values)
        norm = None
        if numeric:
            norm = (LogNorm if _log_scale(values) else Normalize)(
                vmin=min(values), vmax=max(values)
            )
        scatter = axes.scatter(
            [k for k, _, _ in points], [y for _, _, y in points],
            c=[v for _, v, _ in points] if numeric else None, cmap="viridis", norm=norm, s=30,
        )
        if numeric:
            figure.colorbar(scatter, ax=axes, label=series_key)
    _k_axis(axes, [k for k, _, _ in points])
    axes.set_ylabel(f"{metric} at the end of training")
    axes.set_title(f"{metric} against k ({record.directions[0]})")
    axes.grid(alpha=0.3)
    figure.savefig(path)
    return None


def _series_key(record: SweepRecord) -> str:
    """The key that tells the lines apart: lr if it varies, else another swept key that does."""
    complete = [t for t in record.trials if t.complete]

    def varies(key: str) -> bool:
        return len({str(t.params.get(key)) for t in complete}) > 1

    if varies(LR_PARAM):
        return LR_PARAM
    others = [key for key in record.swept_keys if key not in (K_PARAM, LR_PARAM) and varies(key)]
    return others[0] if others else LR_PARAM


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def curves(record: SweepRecord, path: Path) -> str | None:
    """The first objective per epoch, every trial on one chart: colour by k, line style by
    learning rate; pruned trials faded, ending in a cross."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import MaxNLocator

    trials = [trial for trial in record.trials if trial.curve]
    if not trials:
        return f"No validation curves: no trial logged {record.objectives[0]} per epoch."
    ks = [_parse(trial.params.get(K_PARAM, "")) for trial in trials]
    norm = None
    if all(_finite(k) for k in ks):
        norm = (LogNorm if _log_scale(ks) else Normalize)(vmin=min(ks), vmax=max(ks) + 1e-9)
    lrs = sorted({trial.params.get(LR_PARAM, "") for trial in trials}, key=_parse_key)
    # A line style per learning rate when there are few, as in a grid.
    styles = ["-", "--", ":", "-."] if len(lrs) <= 4 else ["-"]
    figure = _figure()
    axes = figure.subplots()
    colours = colormaps["viridis"]
    for index, (trial, k) in enumerate(zip(trials, ks, strict=True)):
        shade = norm(k) if norm is not None else index / max(len(trials) - 1, 1)
        pruned = trial.state == "PRUNED"
        epochs = range(1, len(trial.curve) + 1)
        style = styles[lrs.index(trial.params.get(LR_PARAM, "")) % len(styles)]
        label = f"#{trial.number} k={trial.params.get(K_PARAM, '?')} " \
                f"lr={_short(trial.params.get(LR_PARAM, '?'))}" + (" (pruned)" if pruned else "")
        axes.plot(epochs, trial.curve, color=colours(float(shade)), linestyle=style,
                  alpha=0.45 if pruned else 1.0, label=label)
        if pruned:
            axes.plot(epochs[-1], trial.curve[-1], marker="x", color=colours(float(shade)))
    if len(trials) <= 12:
        axes.legend(fontsize="x-small", ncols=2 if len(trials) > 6 else 1)
    elif norm is not None:
        figure.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=axes, label=K_PARAM)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(record.objectives[0])
    axes.set_title(f"{record.objectives[0]} per epoch, all trials")
    axes.grid(alpha=0.3)
    figure.savefig(path)
    return None


def _parse_key(text: str) -> tuple[str, object]:
    value = _parse(text)
    return (type(value).__name__ if not _finite(value) else "", value)


def history(record: SweepRecord, path: Path) -> str | None:
    """Each trial's objective in trial order, with the best value so far."""
    scored = [t for t in record.trials if t.state in ("COMPLETE", "PRUNED") and t.values
              and _finite(t.values[0])]
    if not scored:
        return "No optimisation history: no trial has a value of the objective."
    metric, direction = record.objectives[0], record.directions[0]
    figure = _figure()
    axes = figure.subplots()
    complete = [t for t in scored if t.state == "COMPLETE"]
    pruned = [t for t in scored if t.state == "PRUNED"]
    axes.scatter([t.number for t in complete], [t.values[0] for t in complete],
                 color="tab:blue", label="complete", zorder=3)
    if pruned:
        axes.scatter([t.number for t in pruned], [t.values[0] for t in pruned],
                     color="tab:gray", marker="x", label="pruned (last value)", zorder=3)
    best, xs, ys = None, [], []
    pick = min if direction == "minimize" else max
    for trial in sorted(complete, key=lambda t: t.number):
        best = trial.values[0] if best is None else pick(best, trial.values[0])
        xs.append(trial.number)
        ys.append(best)
    if xs:
        axes.step(xs, ys, where="post", color="tab:red", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel(metric)
    axes.set_title(f"Optimisation history ({direction})")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.savefig(path)
    return None


def importances(importances: dict[str, dict[str, float]], path: Path) -> None:
    """Horizontal bars per parameter, one colour per objective."""
    params = sorted({name for values in importances.values() for name in values},
                    key=lambda name: max(v.get(name, 0.0) for v in importances.values()))
    figure = _figure(7.0, 1.2 + 0.45 * len(params) * max(1, len(importances)))
    axes = figure.subplots()
    height = 0.8 / len(importances)
    for index, (metric, values) in enumerate(importances.items()):
        axes.barh(
            [i + index * height for i in range(len(params))],
            [values.get(name, 0.0) for name in params],
            height=height, label=metric,
        )
    axes.set_yticks([i + height * (len(importances) - 1) / 2 for i in range(len(params))])
    axes.set_yticklabels(params)
    axes.set_xlabel("importance (fANOVA, sums to 1 per objective)")
    axes.set_xlim(0, 1)
    axes.set_title("Parameter importances")
    if len(importances) > 1:
        axes.legend(fontsize="small")
    axes.grid(alpha=0.3, axis="x")
    figure.savefig(path)


def pareto(record: SweepRecord, path: Path) -> str | None:
    """The complete trials in the plane of the first two objectives, the front highlighted."""
    complete = [trial for trial in record.trials if trial.complete]
    if len(complete) < 2:
        return "No Pareto front: it needs two complete trials."
    points = [trial.values for trial in complete]
    front = set(pareto_front(points, record.directions))
    figure = _figure()
    axes = figure.subplots()
    rest = [p for i, p in enumerate(points) if i not in front]
    if rest:
        axes.scatter([p[0] for p in rest], [p[1] for p in rest], color="tab:gray",
                     label="dominated")
    on_front = sorted(points[i] for i in front)
    axes.plot([p[0] for p in on_front], [p[1] for p in on_front], color="tab:red",
              marker="o", label="Pareto front")
    for i in front:
        axes.annotate(f"#{complete[i].number}", points[i][:2], fontsize="x-small",
                      xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel(f"{record.objectives[0]} ({record.directions[0]})")
    axes.set_ylabel(f"{record.objectives[1]} ({record.directions[1]})")
    title = "Pareto front"
    if len(record.objectives) > 2:
        title += f" (first two of {len(record.objectives)} objectives)"
    axes.set_title(title)
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.savefig(path)
    return None
