"""Train an LSTM with truncated backpropagation through time, logged to MLflow.

    python -m src.train                                 # one run on the default configs
    python -m src.train data=adding tbptt.k=25          # any key can be overridden
    python -m src.train -m tbptt.k=5,10,20              # a grid: one job per k
    python -m src.train -m sweep=k_lr                   # an Optuna sweep (see sweeps/)
    python -m src.train --help                          # the config groups and their options

The config is checked before anything heavy is imported, so a typo fails in about a second.
Torch, Lightning and MLflow are imported inside `train`, which keeps `--help` instant.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, ListConfig

from src.config import ConfigError, validate

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from src.data import SequenceData
    from src.module import TBPTTModule

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def objective(metrics: dict[str, float], optimized_metric: Any) -> float | tuple[float, ...]:
    """The value (or values, for several objectives) a sweeper optimises."""
    names = list(optimized_metric) if isinstance(optimized_metric, ListConfig | list) else None
    for name in names or [optimized_metric]:
        if name not in metrics:
            raise KeyError(
                f"optimized_metric names {name!r}, which this run did not log; "
                f"logged metrics are {', '.join(sorted(metrics))}"
            )
    if names is None:
        return metrics[optimized_metric]
    return tuple(metrics[name] for name in names)


# An LSTM gets one thread per this many multiply-adds of a time step (2^23: hidden 512 in
# batches of 8). Smaller kernels are not worth splitting: a second thread adds synchronisation,
# and on a busy machine it made steps of hidden 20 and 256 10 to 50 times slower
# (BENCHMARKS.md, "Threads").
THREADED_WORK = 1 << 23


def torch_threads(setting: Any, work_per_step: int | None = None) -> int:
    """Threads for this run: the cores shared out among the runs that go on in parallel.

    With `work_per_step` (multiply-adds, see `lstm_work`) given, a run also gets no more than
    one thread per `THREADED_WORK` of it, so a small model runs on one thread.
    """
    if setting != "auto":
        return int(setting)
    useful = max(1, (work_per_step or 0) // THREADED_WORK) if work_per_step is not None else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    parallel = 1
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        parallel = int(hydra_cfg.launcher.get("n_jobs", 1) or 1)
        if parallel < 0:
            parallel = cores + 1 + parallel  # as in joblib: -1 is every core
        # The Optuna sweeper launches at most its own n_jobs trials at a time.
        batch = hydra_cfg.sweeper.get("n_jobs")
        if isinstance(batch, int) and batch > 0:
            parallel = min(parallel, batch)
    except (ValueError, TypeError):
        pass
    share = max(1, cores // max(1, parallel))
    return share if useful is None else min(share, useful)


def train(cfg: DictConfig) -> dict[str, float]:
    """Build the data and model, train under an MLflow run, and return the final metrics."""
    from hydra.core.hydra_config import HydraConfig

    from src import sweep_tracking, tracking

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)

    # Reach the tracking store first, before Lightning's import (seconds): a dead server
    # should cost seconds, not a trained model.
    tracking_uri = tracking.resolve_tracking_uri(cfg.logger.tracking_uri, hydra_cfg.runtime.cwd)
    client = tracking.client_for(tracking_uri)

    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from src import resume
    from src.pruning import sweep_trial

    _quiet_lightning()

    data, module = build_module(cfg)

    # In a sweep, the run is a child of the sweep's parent run (src/sweep_tracking.py).
    job = sweep_tracking.job_run(client, cfg, hydra_cfg)
    # In an Optuna sweep, the job reports to its trial and may be pruned (src/pruning.py).
    trial = sweep_trial(hydra_cfg.sweeper, cfg.optimized_metric)
    run_id = None
    if cfg.ckpt_path:
        # Training goes on in the run the checkpoint came from (src/resume.py).
        run_id = resume.reopen_run(client, cfg.ckpt_path, tracking.config_params(cfg))
    if run_id is None:
        run_id = tracking.create_run(
            client,
            cfg,
            run_name=job.run_name,
            overrides=list(hydra_cfg.overrides.task),
            parent_run_id=job.parent_run_id,
            extra_tags=job.tags | (trial.tags() if trial else {}),
        )
    if trial:
        trial.attach_run(run_id)
    # Which thread count `trainer.num_threads=auto` chose, for comparing runs' speed.
    client.set_tag(run_id, "torch.num_threads", str(torch.get_num_threads()))
    trainer = build_trainer(
        cfg,
        logger=MLFlowLogger(
            experiment_name=cfg.logger.experiment_name, tracking_uri=tracking_uri, run_id=run_id
        ),
        callbacks=[
            # One file, rewritten after every epoch: what an interrupted run resumes from.
            # (save_top_k=0 with save_last=True would write it only when training ends.)
            ModelCheckpoint(
                dirpath=output_dir / "checkpoints",
                filename="last",
                save_top_k=1,
                enable_version_counter=False,
            ),
            resume.RunIdInCheckpoint(run_id),
            *(trial.callbacks() if trial else []),
        ],
        default_root_dir=output_dir,
    )

    started = time.perf_counter()
    status = "FAILED"
    try:
        # weights_only: unpickling a checkpoint may not run code; ours hold only plain types.
        trainer.fit(module, data.train, data.val, ckpt_path=cfg.ckpt_path, weights_only=True)
        if trainer.interrupted:
            status = "KILLED"
            raise KeyboardInterrupt("training was interrupted")
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit) as error:
        status = "KILLED"
        last = output_dir / "checkpoints" / "last.ckpt"
        code = resume.interrupted(error, run_id, last, list(hydra_cfg.overrides.task))
        raise SystemExit(code) from None
    except Exception:
        # A trial the pruner stopped ended early on purpose; the sweeper records it PRUNED.
        if trial and trial.pruned_at is not None:
            status = "KILLED"
        raise
    finally:
        if trial:
            client.set_tag(run_id, "trial.state", trial.state(status))
        if status == "FINISHED" and cfg.logger.log_checkpoint:
            last = output_dir / "checkpoints" / "last.ckpt"
            if last.exists():
                client.log_artifact(run_id, str(last), "checkpoints")
        client.set_terminated(run_id, status)

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics["perf/wall_seconds"] = time.perf_counter() - started
    log.info(
        "%s = %.4f | MLflow run %s in experiment %r\nCompare runs: mlflow ui "
        "--backend-store-uri %s",
        cfg.optimized_metric if isinstance(cfg.optimized_metric, str) else "objective",
        metrics.get(str(cfg.optimized_metric), float("nan")),
        run_id,
        cfg.logger.experiment_name,
        tracking.mask_uri(tracking_uri),
    )
    return metrics


def build_module(cfg: DictConfig) -> tuple[SequenceData, TBPTTModule]:
    """Set the thread count and the seeds, then build the data and the LightningModule.

    `train` and the benchmarks (benchmarks/bench_train.py) both build a run through this
    function and `build_trainer`, so what is timed is what a run does.
    """
    import lightning.pytorch as pl
    import torch

    from src.data import build_data
    from src.model import SequenceLSTM
    from src.module import TBPTTModule

    torch.set_num_threads(torch_threads(cfg.trainer.num_threads, lstm_work(cfg)))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_data(cfg.data, stream=cfg.tbptt.stream, seed=cfg.seed)
    model = SequenceLSTM(
        data.spec,
        hidden_size=cfg.model.hidden_size,
        num_layers=cfg.model.num_layers,
        dropout=cfg.model.dropout,
        embedding_dim=cfg.model.embedding_dim,
    )
    module = TBPTTModule(
        model,
        data.spec,
        cfg.tbptt,
        optimizer_factory=_optimizer_factory(cfg.optimizer, cfg.trainer),
        stream=data.stream,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        detect_divergence=cfg.trainer.detect_divergence,
        seed=cfg.seed,
        direct_steps=cfg.trainer.get("direct_steps", True),
    )
    return data, module


def lstm_work(cfg: DictConfig) -> int:
    """Multiply-adds of the recurrent matrix products in one time step of a batch."""
    hidden = cfg.model.hidden_size
    return 4 * hidden * hidden * cfg.data.batch_size * cfg.model.num_layers


def build_trainer(
    cfg: DictConfig,
    logger: Any,
    callbacks: list[Any],
    default_root_dir: str | Path | None = None,
) -> pl.Trainer:
    """The Lightning Trainer that `cfg.trainer` describes, with `callbacks` and the progress bar.

    Checkpointing is on exactly when `callbacks` holds a `ModelCheckpoint`.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from src.module import FrozenSetUp, TrainingProgressBar

    progress = [TrainingProgressBar()] if cfg.trainer.enable_progress_bar else []
    return pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=_devices(cfg.trainer),
        precision=cfg.trainer.precision,
        max_epochs=cfg.trainer.max_epochs,
        limit_train_batches=cfg.trainer.get("limit_train_batches"),
        limit_val_batches=cfg.trainer.get("limit_val_batches"),
        logger=logger,
        callbacks=[*callbacks, *progress, FrozenSetUp()],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=default_root_dir,
    )


def _quiet_lightning() -> None:
    # The user sees the progress bar and one summary; Lightning's banner lines and these
    # warnings (about logging intervals this module does not use) are noise here.
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _optimizer_factory(optimizer_cfg: DictConfig, trainer_cfg: DictConfig) -> Any:
    from hydra.utils import instantiate

    kwargs = {}
    # The fused kernel steps a small model several times faster; CPU and CUDA both have it.
    # Not with 16-mixed: a fused optimizer unscales the gradients inside its step, so the
    # gradient scaler cannot unscale them before clipping, and Lightning refuses to clip.
    if optimizer_cfg.get("fused", "absent") is None:
        kwargs["fused"] = trainer_cfg.accelerator in ("cpu", "gpu", "cuda", "auto") and str(
            trainer_cfg.precision
        ) not in ("16-mixed", "16")
    return instantiate(optimizer_cfg, **kwargs)


def _devices(trainer_cfg: DictConfig) -> Any:
    # Workers sharing a host each claim a GPU of their own (see src/gpus.py).
    lock_dir = trainer_cfg.get("gpu_lock_dir")
    if trainer_cfg.accelerator not in ("gpu", "cuda") or not lock_dir:
        return trainer_cfg.devices
    import torch

    from src.gpus import claim_gpu

    return [claim_gpu(lock_dir, torch.cuda.device_count())]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    single_run = HydraConfig.get().mode == RunMode.RUN
    try:
        validate(cfg)
        metrics = train(cfg)
        return objective(metrics, cfg.optimized_metric)
    except ConfigError as error:
        if not single_run:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        # The tracking store and the data are the usual suspects; a traceback adds nothing.
        from src.tracking import TrackingError

        if single_run and (isinstance(error, TrackingError) or type(error).__name__ in {
            "DivergenceError"
        }):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        raise


def _share_hydra_help_repository() -> None:
    # `--help` lists every config group, and Hydra copies its whole config repository afresh
    # for each group it lists (85 deep copies, two thirds of the time --help takes). Listing
    # is read-only, so one copy per loader and overrides serves them all.
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        build = ConfigLoaderImpl._parse_overrides_and_create_caching_repo
    except (ImportError, AttributeError):
        return
    built: dict[tuple, Any] = {}

    def shared(loader: Any, config_name: str | None, overrides: list[str]) -> Any:
        key = (id(loader), config_name, tuple(overrides))
        if key not in built:
            built[key] = build(loader, config_name, overrides)
        return built[key]

    ConfigLoaderImpl._parse_overrides_and_create_caching_repo = shared


if __name__ == "__main__":
    if {"--help", "-h", "--hydra-help"} & set(sys.argv[1:]):
        _share_hydra_help_repository()
    main()
