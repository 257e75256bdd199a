"""A hand-written TBPTT loop in plain PyTorch: the practical limit for the project's speed.

The same arithmetic as the project's fixed-window TBPTT on a regression task: each batch is cut
into windows of k steps, one Adam step per window, the hidden state carried forward detached.
Nothing else happens per step: no hooks, no logging, no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LSTMRegressor(nn.Module):
    """An LSTM and a linear head, named like the project's model so its weights load as-is."""

    def __init__(self, n_features: int, hidden_size: int, n_outputs: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_outputs)

    def forward(self, x: torch.Tensor, hidden=None):  # noqa: ANN001, ANN201
        seq, hidden = self.lstm(x, hidden)
        return self.head(seq), hidden


def train(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    k: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    fused: bool = True,
) -> int:
    """Train `model` in place and return the number of optimizer steps it made.

    The batches come in the project's order: one `randperm` per epoch from a generator seeded
    with `seed`. On a GPU it returns after a final synchronisation, so a clock around it is
    right.
    """
    device = inputs.device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    generator = torch.Generator().manual_seed(seed)
    n, seq_len = inputs.shape[:2]
    steps = 0

    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        shuffled_x, shuffled_y = inputs[order], targets[order]
        for start in range(0, n, batch_size):
            x = shuffled_x[start : start + batch_size]
            y = shuffled_y[start : start + batch_size]
            hidden = None
            for t in range(0, seq_len, k):
                output, hidden = model(x[:, t : t + k], hidden)
                loss = F.mse_loss(output, y[:, t : t + k])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                hidden = (hidden[0].detach(), hidden[1].detach())
                steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps


def mse_on(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The loss of `model` on whole sequences: the figure all trainers must agree on."""
    with torch.no_grad():
        output, _ = model(inputs, None)
        return F.mse_loss(output.float(), targets.float()).item()
