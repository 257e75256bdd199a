"""Checks of a composed config, run before anything heavy is imported or started.

Every check names the key, what it must be and what it got, so that a typo costs a second and
not a night of sweeping. Nothing here imports torch, Lightning or MLflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TBPTT_MODES = ("fixed", "k1k2", "random")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


# `${mul:2,${.k}}` in a config: k2 = 2k follows k when a sweep varies k.
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def require_positive_int(key: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, but got {value!r}.")


def require_positive_number(key: str, value: Any) -> None:
    if not _is_number(value) or not value > 0 or value == float("inf"):
        raise ConfigError(f"{key} must be a positive finite number, but got {value!r}.")


def require_range(key: str, value: Any, low: float, high: float, high_open: bool = False) -> None:
    upper = "<" if high_open else "<="
    inside = _is_number(value) and low <= value and (value < high if high_open else value <= high)
    if not inside:
        raise ConfigError(f"{key} must be a number with {low} <= {key} {upper} {high}, "
                          f"but got {value!r}.")


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}.")


def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first value in `cfg` that cannot train."""
    try:
        _check_tbptt(cfg.tbptt)
        _check_data(cfg.data, cfg.tbptt)
        _check_model(cfg.model)
        _check_optimizer(cfg.optimizer)
        _check_trainer(cfg.trainer)
        _check_objective(cfg.optimized_metric)
        if not _is_int(cfg.seed):
            raise ConfigError(f"seed must be an integer, but got {cfg.seed!r}.")
        _check_ckpt_path(cfg.get("ckpt_path"))
        _check_resolves(cfg)
    except OmegaConfBaseException as error:
        # `${oops}`, `???` or a resolver that fails: name the key rather than show a traceback.
        key = getattr(error, "full_key", None) or "a config value"
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"{key} cannot be read: {reason}") from None


def _check_resolves(cfg: DictConfig) -> None:
    # Keys no check reads (tags, run names) must resolve too: MLflow records every one.
    for key in cfg:
        if key == "hydra":
            continue
        value = cfg[key]
        if OmegaConf.is_config(value):
            OmegaConf.to_container(value, resolve=True)


def _check_ckpt_path(path: Any) -> None:
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise ConfigError(f"ckpt_path must be the path of a checkpoint file, but got {path!r}.")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"ckpt_path must be an existing checkpoint file (such as "
            f"outputs/<date>/<time>/checkpoints/last.ckpt), but {path!r} "
            f"{'is a folder' if file.is_dir() else 'does not exist'}."
        )


def _check_tbptt(tbptt: DictConfig) -> None:
    require_choice("tbptt.mode", tbptt.mode, TBPTT_MODES)
    require_positive_int("tbptt.k", tbptt.k)
    require_positive_int("tbptt.k1", tbptt.k1)
    require_positive_int("tbptt.k2", tbptt.k2)
    if tbptt.mode == "k1k2" and tbptt.k2 < tbptt.k1:
        raise ConfigError(
            f"tbptt.k2 must be at least tbptt.k1 (it is the span the loss of k1 steps "
            f"backpropagates through), but got k1={tbptt.k1} and k2={tbptt.k2} "
            f"(k1 follows tbptt.k unless set)."
        )
    if tbptt.mode == "random":
        require_range("tbptt.p_base", tbptt.p_base, 0.0, 1.0)
        require_range("tbptt.std", tbptt.std, 0.0, float("inf"))
        require_positive_int("tbptt.min_len", tbptt.min_len)
    if tbptt.stream is not None and not isinstance(tbptt.stream, bool):
        raise ConfigError(f"tbptt.stream must be true, false or null, but got {tbptt.stream!r}.")


def _check_data(data: DictConfig, tbptt: DictConfig) -> None:
    from src.data import DATASETS

    require_choice("data.name", data.name, DATASETS)
    require_positive_int("data.seq_len", data.seq_len)
    require_positive_int("data.batch_size", data.batch_size)

    if data.name == "text":
        check_text_file(data.path)
        require_range("data.val_fraction", data.val_fraction, 0.0, 1.0, high_open=True)
        return

    if tbptt.stream:
        raise ConfigError(
            f"tbptt.stream=true needs a dataset of long streams (data=text), "
            f"but got data={data.name}."
        )
    require_positive_int("data.n_train", data.n_train)
    require_positive_int("data.n_val", data.n_val)
    if data.name == "average":
        require_positive_int("data.n_features", data.n_features)
        if data.n_features % 2:
            raise ConfigError(
                f"data.n_features must be even (the target adds its two halves), "
                f"but got {data.n_features}."
            )
    if data.name == "echo":
        if not _is_int(data.vocab_size) or data.vocab_size < 2:
            raise ConfigError(
                f"data.vocab_size must be an integer >= 2, but got {data.vocab_size!r}."
            )
        require_positive_int("data.lag", data.lag)
        if data.lag >= data.seq_len:
            raise ConfigError(
                f"data.lag must be less than data.seq_len ({data.seq_len}) so that some step "
                f"has a target, but got {data.lag}."
            )
    if data.name == "adding" and data.seq_len < 2:
        raise ConfigError(f"data.seq_len must be at least 2 for adding, but got {data.seq_len}.")


def check_text_file(path: Any) -> None:
    """The file behind `data.path` must exist, be a file, and hold non-empty UTF-8 text."""
    if path is None or path == "":
        raise ConfigError(
            "data.path must name a text file for data=text "
            "(e.g. data=text data.path=data/tinyshakespeare.txt), but got null."
        )
    file = Path(str(path)).expanduser()
    if not file.exists():
        raise ConfigError(f"data.path must be an existing text file, but {str(file)!r} "
                          f"does not exist (resolved to {str(file.resolve())!r}).")
    if not file.is_file():
        raise ConfigError(f"data.path must be a file, but {str(file)!r} is a folder.")
    if file.stat().st_size == 0:
        raise ConfigError(f"data.path must be a non-empty text file, but {str(file)!r} is empty.")

    # A text file has no NUL bytes and decodes as UTF-8; the head of the file tells.
    with file.open("rb") as handle:
        head = handle.read(1 << 16)
    try:
        if b"\x00" in head:
            raise UnicodeDecodeError("utf-8", head, 0, 1, "NUL byte")
        head.decode("utf-8", errors="strict")
    except UnicodeDecodeError as error:
        # A multi-byte character cut at the end of the head is not an error.
        if error.start < len(head) - 4 or b"\x00" in head:
            raise ConfigError(
                f"data.path must be a UTF-8 text file, but {str(file)!r} looks binary "
                f"({error.reason} at byte {error.start})."
            ) from None


def _check_model(model: DictConfig) -> None:
    require_positive_int("model.hidden_size", model.hidden_size)
    require_positive_int("model.num_layers", model.num_layers)
    require_positive_int("model.embedding_dim", model.embedding_dim)
    require_range("model.dropout", model.dropout, 0.0, 1.0, high_open=True)


def _check_optimizer(optimizer: DictConfig) -> None:
    require_positive_number("optimizer.lr", optimizer.lr)
    if "weight_decay" in optimizer:
        require_range("optimizer.weight_decay", optimizer.weight_decay, 0.0, float("inf"))


def _check_trainer(trainer: DictConfig) -> None:
    require_positive_int("trainer.max_epochs", trainer.max_epochs)
    require_choice("trainer.accelerator", trainer.accelerator, ("cpu", "gpu", "cuda", "auto"))
    require_choice("trainer.precision", str(trainer.precision), PRECISIONS)
    if trainer.gradient_clip_val is not None:
        require_positive_number("trainer.gradient_clip_val", trainer.gradient_clip_val)
    threads = trainer.num_threads
    if threads != "auto":
        require_positive_int("trainer.num_threads", threads)
    for key, least in (("limit_train_batches", 1), ("limit_val_batches", 0)):
        _check_batch_limit(f"trainer.{key}", trainer.get(key), least)
    if not isinstance(trainer.get("direct_steps", True), bool):
        raise ConfigError(
            f"trainer.direct_steps must be true or false, but got {trainer.direct_steps!r}."
        )


def _check_batch_limit(key: str, value: Any, least: int) -> None:
    # Lightning reads an int as a number of batches and a float as a fraction of them.
    if value is None or (_is_int(value) and value >= least):
        return
    if isinstance(value, float) and (value > 0.0 or least == 0) and 0.0 <= value <= 1.0:
        return
    raise ConfigError(
        f"{key} must be null, an integer number of batches >= {least} or a fraction in "
        f"{'[0' if least == 0 else '(0'}, 1], but got {value!r}."
    )


def _check_objective(metric: Any) -> None:
    names = list(metric) if isinstance(metric, ListConfig | list) else [metric]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ConfigError(
            f"optimized_metric must be a metric name such as 'val/loss' or a list of them, "
            f"but got {metric!r}."
        )


def flatten(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield `("tbptt.k", 10)`-style pairs for every leaf of the resolved config."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flatten(value, prefix=f"{name}.")
        else:
            yield name, value
