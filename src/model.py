"""The recurrent model: an LSTM between an input layer and a linear head."""

from __future__ import annotations

import torch
from torch import nn

from src.data import TaskSpec

Hidden = tuple[torch.Tensor, torch.Tensor] | None


class SequenceLSTM(nn.Module):
    """An LSTM that maps a sequence to one output per time step.

    Symbols (`input_kind="tokens"`) go through an embedding; real-valued features go straight
    into the LSTM, whose input weights are the projection. `forward` takes and returns the
    hidden state so that truncated BPTT can carry it from window to window.
    """

    def __init__(
        self,
        spec: TaskSpec,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        embedding_dim: int = 32,
    ) -> None:
        super().__init__()
        if spec.input_kind == "tokens":
            self.embed: nn.Module = nn.Embedding(spec.input_size, embedding_dim)
            lstm_input = embedding_dim
        else:
            self.embed = nn.Identity()
            lstm_input = spec.input_size

        # PyTorch applies LSTM dropout between layers only, so it is off for one layer.
        self.lstm = nn.LSTM(
            lstm_input,
            hidden_size,
            num_layers=num_layers,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, spec.output_size)

    def forward(self, x: torch.Tensor, hidden: Hidden = None) -> tuple[torch.Tensor, Hidden]:
        # x: (batch, time) symbols or (batch, time, features)
        # The identity and a dropout of 0 are skipped: each call costs microseconds, and a
        # small model's whole window takes about a millisecond.
        if not isinstance(self.embed, nn.Identity):
            x = self.embed(x)
        seq, hidden = self.lstm(x, hidden)  # seq: (batch, time, hidden_size)
        # hidden: h and c, each (num_layers, batch, hidden_size)
        if self.drop.p > 0:
            seq = self.drop(seq)
        return self.head(seq), hidden
