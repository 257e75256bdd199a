"""The LightningModule that trains a sequence model with truncated BPTT."""

from __future__ import annotations

import gc
import inspect
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.core.optimizer import LightningOptimizer

from src import tbptt
from src.data import TaskSpec
from src.model import SequenceLSTM


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


class TBPTTModule(pl.LightningModule):
    """Manual optimisation: one optimizer step per TBPTT update, several per batch.

    Losses stay on the device as tensors and are logged once per epoch, so a batch costs no
    host synchronisation and no logging call; that is most of the speed over the naive recipe.
    """

    def __init__(
        self,
        model: SequenceLSTM,
        spec: TaskSpec,
        tbptt_cfg: Any,
        optimizer_factory: Callable[..., torch.optim.Optimizer],
        stream: bool = False,
        gradient_clip_val: float | None = None,
        detect_divergence: bool = True,
        seed: int = 0,
        direct_steps: bool = True,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.spec = spec
        self.tbptt_cfg = tbptt_cfg
        self.optimizer_factory = optimizer_factory
        self.stream = stream
        self.gradient_clip_val = gradient_clip_val
        self.detect_divergence = detect_divergence
        self.direct_steps = direct_steps
        self.window_generator = torch.Generator().manual_seed(seed)
        self.loss_fn = _cross_entropy if spec.loss == "ce" else F.mse_loss

        self._hidden: tbptt.Hidden = None
        self._direct = False  # set in on_train_start: see direct_steps_are_safe
        # Fixed and k1k2 schedules by sequence length: reading the config each batch is slow.
        self._schedules: dict[int, list[tbptt.Update]] = {}
        # Every drawn window length over the whole run, logged as an artifact at the end.
        self.window_counts: Counter[int] = Counter()
        self._epoch_start = 0.0
        self._train_started = 0.0
        self._reset_epoch_sums()

    # ---- schedule -----------------------------------------------------------------------

    def schedule(self, seq_len: int) -> list[tbptt.Update]:
        if seq_len in self._schedules:
            return self._schedules[seq_len]
        cfg = self.tbptt_cfg
        if cfg.mode == "k1k2":
            updates = tbptt.k1k2_schedule(seq_len, cfg.k1, cfg.k2)
            return self._schedules.setdefault(seq_len, updates)
        if cfg.mode == "random":
            lengths = tbptt.random_lengths(
                seq_len, cfg.k, cfg.p_base, cfg.std, cfg.min_len, self.window_generator
            )
            self._window_lengths.extend(lengths)
            self.window_counts.update(lengths)
            return tbptt.random_schedule(lengths, cfg.k)
        return self._schedules.setdefault(seq_len, tbptt.fixed_schedule(seq_len, cfg.k))

    # ---- training -----------------------------------------------------------------------

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # Batches on CPU for a CPU run skip Lightning's generic walk through the batch.
        x, y = batch
        if x.device == device and y.device == device:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    def on_train_start(self) -> None:
        self._train_started = time.perf_counter()
        self._direct = self.direct_steps and direct_steps_are_safe(self.trainer)

    def on_train_epoch_start(self) -> None:
        # Stream mode carries the state from batch to batch, but each epoch starts afresh.
        self._hidden = None
        self._reset_epoch_sums()
        self._epoch_start = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()
        base_lrs = [group["lr"] for group in optimizer.param_groups]

        backward_and_step = self._direct_step if self._direct else self._lightning_step

        def step(loss: torch.Tensor, update: tbptt.Update) -> None:
            if update.lr_scale != 1.0:
                for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = lr * update.lr_scale
            backward_and_step(optimizer, loss)

        hidden = self._hidden if self.stream else None
        losses, hidden = tbptt.run_updates(
            self.model,
            x,
            y,
            self.schedule(x.shape[1]),
            self.loss_fn,
            step,
            hidden=hidden,
            first_target=self.spec.first_target,
        )
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr
        self._hidden = hidden

        if losses:
            stacked = torch.stack(losses)
            if self.detect_divergence:
                self._check_finite(stacked, batch_idx)
            self._loss_sum += stacked.sum()
            self._n_updates += len(losses)
        self._n_timesteps += x.shape[0] * x.shape[1]

    def _lightning_step(self, optimizer: LightningOptimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()  # clips in on_before_optimizer_step

    def _direct_step(self, optimizer: LightningOptimizer, loss: torch.Tensor) -> None:
        # The same arithmetic as _lightning_step, straight on the torch optimizer: Lightning's
        # wrappers and hooks cost about as much as the window of a small LSTM.
        raw = optimizer.optimizer
        raw.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_clip_val is not None:
            grads = [p.grad for group in raw.param_groups for p in group["params"]
                     if p.grad is not None]
            clip_grad_norm(grads, self.gradient_clip_val)
        # Lightning's manual loop counts optimizer steps (trainer.global_step) in these calls.
        optimizer._on_before_step()
        raw.step()
        optimizer._on_after_step()

    def _check_finite(self, losses: torch.Tensor, batch_idx: int) -> None:
        # One host synchronisation per batch, not per window.
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return
        window = int((~finite).nonzero()[0, 0])
        raise DivergenceError(
            f"the training loss diverged to {losses[window].item()} in epoch "
            f"{self.current_epoch}, batch {batch_idx}, window {window}; lower optimizer.lr "
            f"or set trainer.gradient_clip_val"
        )

    def on_train_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._epoch_start
        train_loss = (self._loss_sum / max(self._n_updates, 1)).item()
        metrics = {
            "train/loss": train_loss,
            "perf/epoch_seconds": seconds,
            "perf/timesteps_per_second": self._n_timesteps / max(seconds, 1e-9),
            "perf/updates_per_second": self._n_updates / max(seconds, 1e-9),
            "perf/wall_seconds": time.perf_counter() - self._train_started,
        }
        if self._window_lengths:
            lengths = torch.tensor(self._window_lengths, dtype=torch.float32)
            metrics["tbptt/window_mean"] = lengths.mean().item()
            metrics["tbptt/window_min"] = lengths.min().item()
            metrics["tbptt/window_max"] = lengths.max().item()
        self.log("train/loss", metrics.pop("train/loss"), on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=False)

    def on_train_end(self) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        if self.window_counts and isinstance(self.logger, MLFlowLogger):
            counts = {str(length): n for length, n in sorted(self.window_counts.items())}
            self.logger.experiment.log_dict(
                self.logger.run_id, counts, "tbptt/window_length_counts.json"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Clip here rather than before optimizer.step(): with precision=16-mixed the gradients
        # are unscaled only inside step(), just before this hook.
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)

    def _reset_epoch_sums(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._n_updates = 0
        self._n_timesteps = 0
        self._window_lengths: list[int] = []

    # ---- validation ---------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_hidden: tbptt.Hidden = None
        self._val_sums = torch.zeros(3, device=self.device)  # loss * n, metric * n, n

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        hidden = self._val_hidden if self.stream else None
        output, hidden = self.model(x, hidden)
        self._val_hidden = hidden

        start = self.spec.first_target
        output, target = output[:, start:], y[:, start:]
        loss = self.loss_fn(output, target)
        if self.spec.loss == "ce":
            metric = (output.argmax(dim=-1) == target).float().mean()
        elif self.spec.name == "adding":
            # The classic criterion: a sum within 0.04 of the truth counts as solved.
            metric = ((output - target).abs() < 0.04).float().mean()
        else:
            metric = loss
        n = target.numel()
        self._val_sums += torch.stack(
            [loss.detach() * n, metric.detach() * n, torch.tensor(n, device=self.device)]
        )

    def on_validation_epoch_end(self) -> None:
        loss_sum, metric_sum, n = self._val_sums.tolist()
        loss = loss_sum / max(n, 1)
        metric = metric_sum / max(n, 1)
        metrics = {"val/loss": loss}
        if self.spec.metric == "val/bpc":
            metrics["val/bpc"] = loss / math.log(2)
        elif self.spec.metric == "val/rmse":
            metrics["val/rmse"] = math.sqrt(max(metric, 0.0))
        else:
            metrics[self.spec.metric] = metric
        self.log_dict(metrics, on_epoch=True, prog_bar=True)


# Lightning reads training_step's signature (inspect.getfullargspec) before every batch; with
# the signature stored on the function that is a lookup instead of about 0.1 ms of parsing.
TBPTTModule.training_step.__signature__ = inspect.signature(TBPTTModule.training_step)


class FrozenSetUp(Callback):
    """Keeps the objects made before training out of the garbage collector's full passes.

    Imports and set-up leave about 400,000 objects, and one full pass over them took 0.4 s
    here: several percent of a short trial. They are handed back when the fit ends or fails.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gc.freeze()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gc.unfreeze()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        gc.unfreeze()


class TrainingProgressBar(TQDMProgressBar):
    """One bar per training epoch; validation takes a fraction of a second and shows none."""

    _drawn_at = 0.0

    def init_validation_tqdm(self):  # noqa: ANN201 (Lightning's own return type)
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        # Drawing the bar costs about as much as a window of a small LSTM: draw it at most ten
        # times a second, and at the last batch, rather than after every batch.
        now = time.monotonic()
        if now - self._drawn_at >= 0.1 or batch_idx + 1 == self.train_progress_bar.total:
            self._drawn_at = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def direct_steps_are_safe(trainer: pl.Trainer) -> bool:
    """Whether backward and optimizer steps may bypass Lightning's wrappers in this run.

    Lightning's `manual_backward` and `LightningOptimizer.step` scale the loss for 16-mixed,
    synchronise gradients across devices, and call the `on_before_backward`,
    `on_after_backward`, `on_before_zero_grad` and `on_before_optimizer_step` hooks. On one
    device without a gradient scaler, and with no callback on those hooks, none of that happens
    and calling torch directly gives the same result faster.
    """
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden

    plugin = trainer.precision_plugin
    unscaled = type(plugin) is Precision or (
        type(plugin) is MixedPrecision and plugin.scaler is None
    )
    hooks = ("on_before_backward", "on_after_backward", "on_before_zero_grad",
             "on_before_optimizer_step")
    hooked = any(
        is_overridden(hook, callback, Callback) for callback in trainer.callbacks for hook in hooks
    )
    # The module's own on_before_optimizer_step clips, which the direct step does itself; any
    # other hook of a subclass needs Lightning's path.
    module = trainer.lightning_module
    hooked = hooked or any(is_overridden(hook, module, TBPTTModule) for hook in hooks)
    return unscaled and type(trainer.strategy) is SingleDeviceStrategy and not hooked


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> None:
    """Scale `grads` in place to a total 2-norm of at most `max_norm`.

    The arithmetic of `torch.nn.utils.clip_grad_norm_` in four kernel calls: on CPU that takes
    a third of its time, which matters when it runs after every window.
    """
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp_(max=1.0))


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # output: (batch, time, classes), target: (batch, time)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
