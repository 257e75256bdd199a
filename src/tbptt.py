"""Truncated backpropagation through time, independent of Lightning.

A batch of sequences is trained as a list of *updates*. Each update is one optimizer step: the
model runs from `bp_start` to `end`, the loss is taken on the steps `[loss_start, end)`, and the
gradient flows back to `bp_start` and no further, because the hidden state that enters there
is detached.

- Plain TBPTT with window k: updates `[s, s + k)` with `bp_start = loss_start = s`.
- TBPTT(k1, k2): an update every k1 steps whose loss backpropagates through the last k2 steps,
  so `bp_start = loss_start - (k2 - k1)`; the steps in `[bp_start, loss_start)` are run again
  with the current weights (the usual way, since an LSTM only returns its final state).
- Random window lengths: plain windows whose lengths are drawn around k, each carrying a
  learning-rate scale of length / k.

The module only needs `model(x, hidden) -> (output, hidden)` with time on dimension 1.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Hidden = Any  # an LSTM's (h, c), or None before the first step


@dataclass(frozen=True)
class Update:
    """One optimizer step over the time steps `[bp_start, end)`, loss on `[loss_start, end)`."""

    bp_start: int
    loss_start: int
    end: int
    lr_scale: float = 1.0

    @property
    def length(self) -> int:
        return self.end - self.loss_start


def window_bounds(seq_len: int, k: int) -> list[tuple[int, int]]:
    """Cut `seq_len` time steps into windows of `k` steps; the last one may be shorter.

    >>> window_bounds(100, 30)
    [(0, 30), (30, 60), (60, 90), (90, 100)]
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, but got {seq_len}.")
    if k < 1:
        raise ValueError(f"k must be a positive integer, but got {k}.")
    return [(start, min(start + k, seq_len)) for start in range(0, seq_len, k)]


def fixed_schedule(seq_len: int, k: int) -> list[Update]:
    return [Update(start, start, end) for start, end in window_bounds(seq_len, k)]


def k1k2_schedule(seq_len: int, k1: int, k2: int) -> list[Update]:
    if k2 < k1:
        raise ValueError(f"k2 must be at least k1, but got k1={k1} and k2={k2}.")
    # The span reaches k2 - k1 steps before the update's own window, so a last, shorter
    # window backpropagates k2 - k1 steps beyond itself too, as plain TBPTT (k1 = k2) needs.
    return [
        Update(max(0, start - (k2 - k1)), start, end)
        for start, end in window_bounds(seq_len, k1)
    ]


def random_lengths(
    seq_len: int,
    k: int,
    p_base: float,
    std: float,
    min_len: int,
    generator: torch.Generator,
) -> list[int]:
    """Draw window lengths around k until they cover `seq_len` steps.

    The base length is k with probability `p_base` and k / 2 otherwise; the length is then
    drawn from a normal around the base with standard deviation `std`, and kept at least
    `min_len`. The last window is cut to end at `seq_len`.
    """
    import torch

    lengths: list[int] = []
    covered = 0
    while covered < seq_len:
        coin, u1, u2 = torch.rand(3, generator=generator).tolist()
        base = k if coin < p_base else k / 2
        # Box-Muller from the same generator keeps the draws reproducible from one seed.
        normal = math.sqrt(-2.0 * math.log(max(u1, 1e-12))) * math.cos(2 * math.pi * u2)
        length = max(min_len, round(base + std * normal))
        length = min(length, seq_len - covered)
        lengths.append(length)
        covered += length
    return lengths


def random_schedule(lengths: Sequence[int], k: int) -> list[Update]:
    updates = []
    start = 0
    for length in lengths:
        updates.append(Update(start, start, start + length, lr_scale=length / k))
        start += length
    return updates


def _detach(hidden: Hidden) -> Hidden:
    if hidden is None:
        return None
    return tuple(h.detach() for h in hidden)


def run_updates(
    model: Callable[[torch.Tensor, Hidden], tuple[torch.Tensor, Hidden]],
    x: torch.Tensor,
    y: torch.Tensor,
    updates: Sequence[Update],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    step: Callable[[torch.Tensor, Update], None],
    hidden: Hidden = None,
    first_target: int = 0,
) -> tuple[list[torch.Tensor], Hidden]:
    """Train on one batch, update by update.

    Args:
        model: maps `(x[:, a:b], hidden)` to `(output[:, a:b], hidden at b)`.
        x: inputs, time on dimension 1.
        y: targets, time on dimension 1.
        updates: the schedule, in time order, covering `[0, T)` with their loss spans.
        loss_fn: maps `(output, target)` of a span to a scalar loss.
        step: called with each update's loss; it backpropagates and steps the optimizer.
        hidden: the state entering step 0 (carried from the previous batch in stream mode).
        first_target: steps before it carry no target (echo's lag, adding's last step); an
            update whose loss span ends before it only advances the hidden state.

    Returns:
        The detached loss of every update that had a target, and the detached hidden state
        after the last step, to carry into the next batch in stream mode.
    """
    if _back_to_back(updates):
        return _run_windows(model, x, y, updates, loss_fn, step, hidden, first_target)
    return _run_spans(model, x, y, updates, loss_fn, step, hidden, first_target)


def _back_to_back(updates: Sequence[Update]) -> bool:
    # Plain and random windows: each starts where the last ended and backpropagates through
    # itself only, so the one state to keep is the last one.
    end = 0
    for update in updates:
        if update.bp_start != end or update.loss_start != end:
            return False
        end = update.end
    return True


def _run_windows(
    model: Callable[[torch.Tensor, Hidden], tuple[torch.Tensor, Hidden]],
    x: torch.Tensor,
    y: torch.Tensor,
    updates: Sequence[Update],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    step: Callable[[torch.Tensor, Update], None],
    hidden: Hidden,
    first_target: int,
) -> tuple[list[torch.Tensor], Hidden]:
    # What _run_spans does for back-to-back windows, with none of its bookkeeping: for a small
    # model that bookkeeping costs a few percent of the whole step.
    import torch

    grad_enabled = torch.is_grad_enabled()
    state = _detach(hidden)
    losses = []
    for update in updates:
        start, end = update.bp_start, update.end
        if end > first_target or not grad_enabled:
            output, state = model(x[:, start:end], state)
        else:
            with torch.no_grad():  # no target in this window: it only advances the state
                output, state = model(x[:, start:end], state)
        state = _detach(state)
        if end <= first_target:
            continue
        if first_target > start:
            output, start = output[:, first_target - start :], first_target
        loss = loss_fn(output, y[:, start:end])
        step(loss, update)
        losses.append(loss.detach())
    covered = bool(updates) and updates[-1].end == x.shape[1]
    return losses, state if covered else None


def _run_spans(
    model: Callable[[torch.Tensor, Hidden], tuple[torch.Tensor, Hidden]],
    x: torch.Tensor,
    y: torch.Tensor,
    updates: Sequence[Update],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    step: Callable[[torch.Tensor, Update], None],
    hidden: Hidden,
    first_target: int,
) -> tuple[list[torch.Tensor], Hidden]:
    import torch

    seq_len = x.shape[1]
    grad_enabled = torch.is_grad_enabled()

    # The detached hidden state at every time step an update will start from, kept from the
    # step that reaches it until the last update that starts there (`last_start`).
    starts = {0: _detach(hidden)}
    last_start = {update.bp_start: i for i, update in enumerate(updates)}
    start_steps = sorted(last_start)
    losses = []
    final_hidden = None

    for i, update in enumerate(updates):
        # Later updates that start inside this one's span cut it into segments, so that their
        # start state is at hand. Plain windows have no such cuts.
        inside = start_steps[
            bisect.bisect_right(start_steps, update.bp_start) : bisect.bisect_left(
                start_steps, update.end
            )
        ]
        cuts = [t for t in inside if last_start[t] > i]
        has_target = update.end > max(update.loss_start, first_target)

        if has_target or not grad_enabled:
            outputs = _run_span(model, x, update, cuts, starts)
        else:
            # A span without a target only advances the hidden state: no graph for it.
            with torch.no_grad():
                outputs = _run_span(model, x, update, cuts, starts)

        if update.end == seq_len:
            final_hidden = starts[update.end]
        if not has_target:
            continue

        loss_from = max(update.loss_start, first_target)
        output = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if loss_from > update.loss_start:
            output = output[:, loss_from - update.loss_start :]
        loss = loss_fn(output, y[:, loss_from : update.end])
        step(loss, update)
        losses.append(loss.detach())

    return losses, final_hidden


def _run_span(
    model: Callable[[torch.Tensor, Hidden], tuple[torch.Tensor, Hidden]],
    x: torch.Tensor,
    update: Update,
    cuts: list[int],
    starts: dict[int, Hidden],
) -> list[torch.Tensor]:
    # Run [bp_start, end) segment by segment from the detached state at bp_start, record the
    # detached state at each segment's end, and return the outputs of the loss span.
    state = starts[update.bp_start]
    outputs = []
    segment_start = update.bp_start
    for segment_end in [*cuts, update.end]:
        out, state = model(x[:, segment_start:segment_end], state)
        if segment_end > update.loss_start:
            skip = update.loss_start - segment_start
            outputs.append(out[:, skip:] if skip > 0 else out)
        starts[segment_end] = _detach(state)
        segment_start = segment_end
    return outputs
