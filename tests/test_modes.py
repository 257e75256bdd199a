"""The TBPTT modes inside the Lightning module: stream carry and reset, random windows."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from src.data import build_data
from src.model import SequenceLSTM
from src.module import TBPTTModule


class RecordingLSTM(SequenceLSTM):
    """Records, for every call, the phase, the state it was given and the state it returned."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []

    def forward(self, x, hidden=None):
        output, new_hidden = super().forward(x, hidden)
        given = None if hidden is None else hidden[0].detach().clone()
        phase = "train" if self.training else "val"
        self.calls.append((phase, given, new_hidden[0].detach().clone()))
        return output, new_hidden


def _fit(tmp_path, tbptt: dict, data: dict, epochs: int = 2) -> tuple[TBPTTModule, object]:
    data_cfg = OmegaConf.create(data)
    tbptt_cfg = OmegaConf.create(
        {"mode": "fixed", "k": 4, "k1": 4, "k2": 4, "stream": None, "p_base": 0.9, "std": 2.0,
         "min_len": 1} | tbptt
    )
    sequences = build_data(data_cfg, stream=tbptt_cfg.stream, seed=0)
    model = RecordingLSTM(sequences.spec, hidden_size=6, embedding_dim=4)
    module = TBPTTModule(
        model,
        sequences.spec,
        tbptt_cfg,
        optimizer_factory=lambda params: torch.optim.Adam(params, lr=1e-2),
        stream=sequences.stream,
    )
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, sequences.train, sequences.val)
    return module, sequences


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    return path


def test_stream_mode_carries_state_across_batches_and_resets(tmp_path, text_file) -> None:
    data = {"name": "text", "path": str(text_file), "seq_len": 12, "batch_size": 3,
            "val_fraction": 0.2}
    module, sequences = _fit(tmp_path, {"k": 4}, data)
    assert sequences.stream  # text streams by default

    calls = module.model.calls
    windows_per_batch = 3  # seq_len 12 / k 4
    train_batches = len(sequences.train)
    val_batches = len(sequences.val)
    per_epoch = train_batches * windows_per_batch + val_batches
    assert len(calls) == 2 * per_epoch

    for epoch in range(2):
        epoch_calls = calls[epoch * per_epoch : (epoch + 1) * per_epoch]
        train_calls = epoch_calls[: train_batches * windows_per_batch]
        val_calls = epoch_calls[train_batches * windows_per_batch :]

        # Each epoch starts from a zero state...
        assert train_calls[0][1] is None
        # ...and every later window, across batch boundaries too, starts where the last ended.
        for previous, current in zip(train_calls, train_calls[1:], strict=False):
            assert current[1] is not None
            torch.testing.assert_close(current[1], previous[2])

        # Validation starts afresh and carries its own state from batch to batch.
        assert all(phase == "val" for phase, _, _ in val_calls)
        assert val_calls[0][1] is None
        for previous, current in zip(val_calls, val_calls[1:], strict=False):
            torch.testing.assert_close(current[1], previous[2])


def test_without_stream_each_batch_starts_from_zero(tmp_path) -> None:
    data = {"name": "echo", "vocab_size": 4, "lag": 2, "seq_len": 8, "n_train": 12, "n_val": 6,
            "batch_size": 4}
    module, _ = _fit(tmp_path, {"k": 4}, data, epochs=1)
    train_calls = [call for call in module.model.calls if call[0] == "train"]
    # Two windows a batch: the first starts from zero, the second from the first's end.
    assert [given is None for _, given, _ in train_calls] == [True, False] * 3


def test_random_windows_are_drawn_and_counted(tmp_path) -> None:
    data = {"name": "average", "n_features": 4, "seq_len": 30, "n_train": 8, "n_val": 4,
            "batch_size": 4}
    module, _ = _fit(tmp_path, {"mode": "random", "k": 6}, data, epochs=2)
    counts = module.window_counts
    # 2 epochs x 2 batches, each batch covering all 30 steps with drawn windows.
    assert sum(length * n for length, n in counts.items()) == 2 * 2 * 30
    assert len(counts) > 1  # the lengths vary
    train_calls = [call for call in module.model.calls if call[0] == "train"]
    assert len(train_calls) == sum(counts.values())
    # Each update scales the learning rate by its length over k; the base rate is restored.
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == 1e-2
