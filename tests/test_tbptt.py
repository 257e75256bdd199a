"""The TBPTT semantics of src/tbptt.py, on a real LSTM with fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src import tbptt
from src.data import TaskSpec
from src.model import SequenceLSTM

SPEC = TaskSpec("average", "features", 4, 2, "mse", "val/rmse")


@pytest.mark.parametrize(
    ("seq_len", "k", "expected"),
    [
        (100, 30, [(0, 30), (30, 60), (60, 90), (90, 100)]),  # k does not divide T
        (6, 2, [(0, 2), (2, 4), (4, 6)]),  # k divides T
        (3, 1, [(0, 1), (1, 2), (2, 3)]),  # k = 1
        (5, 5, [(0, 5)]),  # k = T
        (5, 50, [(0, 5)]),  # k > T: one window, full BPTT
        (1, 1, [(0, 1)]),
    ],
)
def test_window_bounds(seq_len: int, k: int, expected: list[tuple[int, int]]) -> None:
    assert tbptt.window_bounds(seq_len, k) == expected


@pytest.mark.parametrize(("seq_len", "k"), [(0, 3), (5, 0), (5, -2)])
def test_window_bounds_rejects_non_positive(seq_len: int, k: int) -> None:
    with pytest.raises(ValueError, match="must be a positive integer"):
        tbptt.window_bounds(seq_len, k)


def _model_and_batch(seed: int = 0, seq_len: int = 12):
    torch.manual_seed(seed)
    model = SequenceLSTM(SPEC, hidden_size=6)
    x = torch.randn(3, seq_len, 4)
    y = torch.randn(3, seq_len, 2)
    return model, x, y


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [12, 13, 100])
def test_k_at_least_seq_len_equals_full_bptt(k: int) -> None:
    model, x, y = _model_and_batch()

    # Full BPTT: one loss over the whole sequence.
    output, _ = model(x)
    F.mse_loss(output, y).backward()
    full = _grads(model)
    model.zero_grad()

    captured = []

    def step(loss: torch.Tensor, update: tbptt.Update) -> None:
        loss.backward()
        captured.append(_grads(model))

    tbptt.run_updates(model, x, y, tbptt.fixed_schedule(12, k), F.mse_loss, step)

    assert len(captured) == 1
    for truncated, reference in zip(captured[0], full, strict=True):
        torch.testing.assert_close(truncated, reference, rtol=1e-6, atol=1e-7)


def test_no_gradient_crosses_a_window_boundary() -> None:
    model, x, y = _model_and_batch()
    x.requires_grad_(True)
    input_grads = []

    def step(loss: torch.Tensor, update: tbptt.Update) -> None:
        (grad,) = torch.autograd.grad(loss, x)
        input_grads.append((update, grad))

    tbptt.run_updates(model, x, y, tbptt.fixed_schedule(12, 4), F.mse_loss, step)

    # The loss of window 2 (steps 4..7) reaches its own inputs and nothing before them.
    update, grad = input_grads[1]
    assert (update.loss_start, update.end) == (4, 8)
    assert torch.count_nonzero(grad[:, :4]) == 0
    assert torch.count_nonzero(grad[:, 4:8]) > 0
    assert torch.count_nonzero(grad[:, 8:]) == 0


@pytest.mark.parametrize(("seq_len", "k"), [(12, 1), (12, 5), (12, 12), (7, 3), (12, 40)])
def test_one_optimizer_step_per_window(seq_len: int, k: int) -> None:
    model, x, y = _model_and_batch(seq_len=seq_len)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = []
    original_step = optimizer.step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return original_step(*args, **kwargs)

    optimizer.step = counting_step

    def step(loss: torch.Tensor, update: tbptt.Update) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    tbptt.run_updates(model, x, y, tbptt.fixed_schedule(seq_len, k), F.mse_loss, step)
    assert len(calls) == math.ceil(seq_len / k)


def test_hidden_state_is_carried_forward() -> None:
    """Window 2 must start from window 1's final state, not from zeros."""
    model, x, y = _model_and_batch()
    outputs = []

    def recording_model(inputs, hidden):
        output, hidden = model(inputs, hidden)
        outputs.append(output.detach())
        return output, hidden

    tbptt.run_updates(
        recording_model, x, y, tbptt.fixed_schedule(12, 6), F.mse_loss, lambda *_: None
    )
    with torch.no_grad():
        full, _ = model(x)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full)


def test_k1k2_equal_is_plain_tbptt() -> None:
    assert tbptt.k1k2_schedule(10, 4, 4) == tbptt.fixed_schedule(10, 4)


def test_k1k2_backpropagates_through_k2_and_no_further() -> None:
    model, x, y = _model_and_batch(seq_len=12)
    x.requires_grad_(True)
    seen = []

    def step(loss: torch.Tensor, update: tbptt.Update) -> None:
        (grad,) = torch.autograd.grad(loss, x)
        seen.append((update, grad))

    tbptt.run_updates(model, x, y, tbptt.k1k2_schedule(12, 3, 7), F.mse_loss, step)

    # Third update: loss on steps 6..8, backpropagating to step 9 - 7 = 2.
    update, grad = seen[2]
    assert (update.bp_start, update.loss_start, update.end) == (2, 6, 9)
    assert torch.count_nonzero(grad[:, :2]) == 0
    assert torch.count_nonzero(grad[:, 2]) > 0
    assert torch.count_nonzero(grad[:, 9:]) == 0


def test_k1k2_beyond_seq_len_equals_full_bptt() -> None:
    model, x, y = _model_and_batch()
    output, _ = model(x)
    F.mse_loss(output, y).backward()
    full = _grads(model)
    model.zero_grad()

    captured = []
    schedule = tbptt.k1k2_schedule(12, 12, 12)
    tbptt.run_updates(
        model, x, y, schedule, F.mse_loss, lambda loss, _: (loss.backward(), captured.append(1))
    )
    assert len(captured) == 1
    for truncated, reference in zip(_grads(model), full, strict=True):
        torch.testing.assert_close(truncated, reference, rtol=1e-6, atol=1e-7)


def test_k1k2_rejects_k2_below_k1() -> None:
    with pytest.raises(ValueError, match="k2 must be at least k1"):
        tbptt.k1k2_schedule(10, 5, 3)


def test_random_lengths_cover_the_sequence_and_repeat_with_the_seed() -> None:
    def draw(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return tbptt.random_lengths(500, 20, 0.9, 4.0, 2, generator)

    lengths = draw(1)
    assert sum(lengths) == 500
    assert min(lengths[:-1]) >= 2
    assert draw(1) == lengths
    assert draw(2) != lengths
    # Most windows are near k, some near k / 2.
    assert 12 <= sum(lengths) / len(lengths) <= 22
    assert any(length < 15 for length in lengths)

    schedule = tbptt.random_schedule(lengths, 20)
    assert schedule[-1].end == 500
    assert schedule[0].lr_scale == pytest.approx(lengths[0] / 20)


def test_windows_before_the_first_target_take_no_step() -> None:
    model, x, y = _model_and_batch()
    steps = []
    tbptt.run_updates(
        model, x, y, tbptt.fixed_schedule(12, 3), F.mse_loss,
        lambda loss, update: steps.append(update.loss_start), first_target=7,
    )
    # Windows [0,3) and [3,6) hold no target; [6,9) does, from step 7.
    assert steps == [6, 9]


def test_final_hidden_state_is_detached_and_carried() -> None:
    model, x, y = _model_and_batch()
    _, hidden = tbptt.run_updates(
        model, x, y, tbptt.fixed_schedule(12, 5), F.mse_loss, lambda *_: None
    )
    with torch.no_grad():
        _, full_hidden = model(x)
    assert not hidden[0].requires_grad
    torch.testing.assert_close(hidden[0], full_hidden[0])
