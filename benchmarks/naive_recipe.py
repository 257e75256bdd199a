"""The naive TBPTT recipe of Lightning's documentation, re-created as a speed baseline.

What makes it naive, kept on purpose: a `Dataset` read item by item through a `DataLoader`, the
batch cut into windows inside `training_step`, every optimizer step through Lightning's wrappers
(`self.optimizers()`, `manual_backward`), a `self.log` call with a progress-bar value for every
batch, and a `Trainer` with its default settings.

What is corrected, so that it does the same arithmetic as the project: the windows are pieces
of `k` time steps (the recipe's `tensor_split(k)` makes k pieces), and the batches come in the
project's shuffled order (a sampler that draws one permutation per epoch from a seeded
generator; torch's `RandomSampler` draws an extra one after each epoch, so its orders differ).
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler


class SequenceDataset(Dataset):
    """Sequences served one at a time, as the recipe's `AverageDataset` does."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


class EpochPermutation(Sampler[int]):
    """One `torch.randperm` per epoch from a seeded generator, as the project's batches are."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class NaiveTBPTT(pl.LightningModule):
    """An LSTM and a linear head, trained window by window with manual optimisation."""

    def __init__(
        self,
        dataset: SequenceDataset,
        hidden_size: int,
        k: int,
        batch_size: int,
        lr: float,
        seed: int,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.dataset = dataset
        self.k = k
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        n_features, n_outputs = dataset.inputs.shape[-1], dataset.targets.shape[-1]
        self.rnn = nn.LSTM(n_features, hidden_size, batch_first=True)
        self.linear_out = nn.Linear(hidden_size, n_outputs)

    def forward(self, x: torch.Tensor, hidden=None):  # noqa: ANN001, ANN201
        seq, hidden = self.rnn(x, hidden)
        return self.linear_out(seq), hidden

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        optimizer = self.optimizers()
        hidden = None
        losses = []
        for x_window, y_window in zip(x.split(self.k, dim=1), y.split(self.k, dim=1), strict=True):
            output, hidden = self(x_window, hidden)
            loss = F.mse_loss(output, y_window)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            hidden = tuple(h.detach() for h in hidden)
            losses.append(loss.detach())
        self.log("train_loss", sum(losses) / len(losses), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochPermutation(len(self.dataset), self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)

    def load_project_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Start from the project model's weights (its `lstm.*` and `head.*` tensors)."""
        renamed = {
            key.replace("lstm.", "rnn.", 1).replace("head.", "linear_out.", 1): value
            for key, value in state.items()
        }
        self.load_state_dict(renamed)
