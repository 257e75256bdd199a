"""The datasets: synthetic tasks made in memory, and character-level text from a file.

Every dataset is held as whole tensors and served in batches by slicing them, never item by
item: for small recurrent models a per-item DataLoader costs more than the model itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

DATASETS = ("average", "echo", "adding", "text")


@dataclass(frozen=True)
class TaskSpec:
    """What the model and the loss must know about a dataset."""

    name: str
    input_kind: Literal["tokens", "features"]
    input_size: int  # vocabulary size for tokens, feature count for features
    output_size: int  # classes for "ce", outputs for "mse"
    loss: Literal["ce", "mse"]
    metric: str  # the task's own validation metric, besides val/loss
    first_target: int = 0  # steps before it carry no target


class BatchIterable:
    """Batches of rows of `(x, y)`, shuffled each pass with its own generator."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int
    ) -> None:
        import torch

        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator)
            x, y = self.x[order], self.y[order]
        else:
            x, y = self.x, self.y
        for start in range(0, n, self.batch_size):
            yield x[start : start + self.batch_size], y[start : start + self.batch_size]


class StreamIterable:
    """Consecutive slices of `n_streams` long token streams: batch i continues batch i - 1.

    The tokens are kept in their compact storage type and widened per batch, so that memory
    grows with the text by one byte a character, not eight.
    """

    def __init__(self, tokens: torch.Tensor, n_streams: int, seq_len: int) -> None:
        per_stream = len(tokens) // n_streams
        if per_stream < 2:
            raise ValueError(
                f"the text is too short for {n_streams} streams: {len(tokens)} characters "
                f"give {per_stream} per stream; lower data.batch_size"
            )
        self.streams = tokens[: n_streams * per_stream].view(n_streams, per_stream)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return math.ceil((self.streams.shape[1] - 1) / self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        last = self.streams.shape[1] - 1
        for start in range(0, last, self.seq_len):
            end = min(start + self.seq_len, last)
            yield (
                self.streams[:, start:end].long(),
                self.streams[:, start + 1 : end + 1].long(),
            )


@dataclass
class SequenceData:
    spec: TaskSpec
    train: BatchIterable | StreamIterable
    val: BatchIterable | StreamIterable
    stream: bool
    vocab: list[str] | None = None


def build_data(data_cfg: Any, stream: bool | None, seed: int) -> SequenceData:
    """Make the dataset that `data_cfg.name` names; `stream=None` lets the dataset decide."""
    import torch

    name = data_cfg.name
    if name == "text":
        return _text(data_cfg, stream=True if stream is None else stream, seed=seed)
    if stream:
        raise ValueError(
            f"tbptt.stream=true needs a dataset of long streams (data=text), but got data={name}"
        )

    generator = torch.Generator().manual_seed(seed)
    make = {"average": _average, "echo": _echo, "adding": _adding}[name]
    spec, (x_train, y_train) = make(data_cfg, data_cfg.n_train, generator)
    _, (x_val, y_val) = make(data_cfg, data_cfg.n_val, generator)
    return SequenceData(
        spec=spec,
        train=BatchIterable(x_train, y_train, data_cfg.batch_size, shuffle=True, seed=seed),
        val=BatchIterable(x_val, y_val, data_cfg.batch_size, shuffle=False, seed=seed),
        stream=False,
    )


def _average(cfg: Any, n: int, generator: torch.Generator) -> tuple[TaskSpec, tuple]:
    import torch

    # (n, seq_len, n_features); the target of a step is made from that step alone.
    x = torch.randn(n, cfg.seq_len, cfg.n_features, generator=generator)
    top, bottom = x.chunk(2, dim=-1)
    y = top + bottom.roll(shifts=1, dims=-1)
    spec = TaskSpec("average", "features", cfg.n_features, y.shape[-1], "mse", "val/rmse")
    return spec, (x, y)


def _echo(cfg: Any, n: int, generator: torch.Generator) -> tuple[TaskSpec, tuple]:
    import torch

    # (n, seq_len) symbols; y[t] = x[t - lag], and steps t < lag have no target.
    x = torch.randint(cfg.vocab_size, (n, cfg.seq_len), generator=generator)
    y = torch.zeros_like(x)
    y[:, cfg.lag :] = x[:, : cfg.seq_len - cfg.lag]
    spec = TaskSpec(
        "echo", "tokens", cfg.vocab_size, cfg.vocab_size, "ce", "val/acc", first_target=cfg.lag
    )
    return spec, (x, y)


def _adding(cfg: Any, n: int, generator: torch.Generator) -> tuple[TaskSpec, tuple]:
    import torch

    # One mark in each half of the sequence; the sum is read at the last step.
    values = torch.rand(n, cfg.seq_len, generator=generator)
    half = cfg.seq_len // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, cfg.seq_len, (n,), generator=generator)
    markers = torch.zeros(n, cfg.seq_len)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0

    x = torch.stack([values, markers], dim=-1)  # (n, seq_len, 2)
    y = torch.zeros(n, cfg.seq_len, 1)
    y[:, -1, 0] = values[rows, first] + values[rows, second]
    spec = TaskSpec("adding", "features", 2, 1, "mse", "val/acc", first_target=cfg.seq_len - 1)
    return spec, (x, y)


def read_text_codes(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Read a text file as a tensor of character codes in the smallest integer type.

    ASCII files are mapped byte by byte without decoding (a 10 MB file costs 10 MB more);
    other UTF-8 files are decoded into code points first.
    """
    import numpy as np
    import torch

    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size and int(raw.max()) < 128:
        # A megabyte at a time, and mapped in place: numpy widens uint8 indices to 8 bytes
        # each, which for a whole 10 MB file would take 80 MB at once.
        chunks = [slice(start, start + (1 << 20)) for start in range(0, raw.size, 1 << 20)]
        counts = sum(np.bincount(raw[chunk], minlength=128) for chunk in chunks)
        present = np.flatnonzero(counts)
        lookup = np.zeros(128, dtype=np.uint8)
        lookup[present] = np.arange(len(present), dtype=np.uint8)
        for chunk in chunks:
            raw[chunk] = lookup[raw[chunk]]
        codes = raw
        vocab = [chr(c) for c in present]
    else:
        text = raw.tobytes().decode("utf-8")
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        present, codes = np.unique(points, return_inverse=True)
        codes = codes.astype(np.uint8 if len(present) <= 256 else np.int32)
        vocab = [chr(c) for c in present]
    return torch.from_numpy(codes), vocab


def _text(cfg: Any, stream: bool, seed: int) -> SequenceData:
    codes, vocab = read_text_codes(cfg.path)
    n_val = max(int(len(codes) * cfg.val_fraction), cfg.seq_len + 1)
    train_codes, val_codes = codes[:-n_val], codes[-n_val:]
    spec = TaskSpec("text", "tokens", len(vocab), len(vocab), "ce", "val/bpc")

    if stream:
        train = StreamIterable(train_codes, cfg.batch_size, cfg.seq_len)
        val = StreamIterable(val_codes, min(cfg.batch_size, n_val // 2), cfg.seq_len)
    else:
        x_train, y_train = _chunks(train_codes, cfg.seq_len)
        x_val, y_val = _chunks(val_codes, cfg.seq_len)
        train = BatchIterable(x_train, y_train, cfg.batch_size, shuffle=True, seed=seed)
        val = BatchIterable(x_val, y_val, cfg.batch_size, shuffle=False, seed=seed)
    return SequenceData(spec=spec, train=train, val=val, stream=stream, vocab=vocab)


def _chunks(codes: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Independent sequences of seq_len inputs, each target shifted by one character.
    n = (len(codes) - 1) // seq_len
    x = codes[: n * seq_len].view(n, seq_len).long()
    y = codes[1 : n * seq_len + 1].view(n, seq_len).long()
    return x, y
