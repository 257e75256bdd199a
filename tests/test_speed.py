"""The settings and short cuts that make training fast must not change what it computes."""

from __future__ import annotations

import gc
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from src.config import ConfigError, validate
from src.data import read_text_codes
from src.module import clip_grad_norm
from src.train import THREADED_WORK, build_module, build_trainer, lstm_work, torch_threads
from tests.conftest import REPO, compose, subprocess_env

# Clipping at 0.05 is active at almost every window of this tiny run, so it is compared too.
AVERAGE = [
    "data=average",
    "data.n_train=24",
    "data.n_val=8",
    "data.seq_len=12",
    "data.batch_size=8",
    "data.n_features=4",
    "model.hidden_size=8",
    "tbptt.k=5",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.num_threads=1",
    "trainer.gradient_clip_val=0.05",
]


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e3])
def test_clip_grad_norm_matches_torch(max_norm: float) -> None:
    torch.manual_seed(0)
    grads = [torch.randn(4, 3), torch.randn(7), torch.randn(2, 2, 2)]
    expected = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for param, grad in zip(params, expected, strict=True):
        param.grad = grad
    torch.nn.utils.clip_grad_norm_(params, max_norm)

    clip_grad_norm(grads, max_norm)

    for got, want in zip(grads, params, strict=True):
        torch.testing.assert_close(got, want.grad, rtol=1e-6, atol=1e-7)


class CountBackward(Callback):
    """A callback on a backward hook: Lightning must then run its own backward path."""

    def __init__(self) -> None:
        self.calls = 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # noqa: ANN001
        self.calls += 1


def _fit(callbacks: list[Callback], overrides: tuple[str, ...] = ()):  # noqa: ANN202
    cfg = compose([*AVERAGE, *overrides])
    data, module = build_module(cfg)
    trainer = build_trainer(cfg, logger=False, callbacks=callbacks)
    trainer.fit(module, data.train, data.val)
    return trainer, module


def test_direct_steps_equal_lightnings_own() -> None:
    direct_trainer, direct = _fit([])
    counter = CountBackward()
    hooked_trainer, hooked = _fit([counter])

    assert direct._direct and not hooked._direct
    # 24 sequences in batches of 8, 12 steps in windows of 5: 3 batches x 3 windows x 2 epochs.
    assert direct_trainer.global_step == hooked_trainer.global_step == 18
    assert counter.calls == 18
    for (name, a), (_, b) in zip(
        direct.model.state_dict().items(), hooked.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert math.isclose(
        direct_trainer.callback_metrics["train/loss"],
        hooked_trainer.callback_metrics["train/loss"],
        rel_tol=1e-5,
    )


def test_a_subclass_hook_takes_lightnings_path() -> None:
    import src.module

    class Hooked(src.module.TBPTTModule):
        def on_after_backward(self) -> None:
            self.after_backward = getattr(self, "after_backward", 0) + 1

    cfg = compose([*AVERAGE, "trainer.max_epochs=1"])
    data, module = build_module(cfg)
    hooked = Hooked(module.model, module.spec, module.tbptt_cfg, module.optimizer_factory)
    trainer = build_trainer(cfg, logger=False, callbacks=[])
    trainer.fit(hooked, data.train, data.val)
    assert not hooked._direct
    assert hooked.after_backward == trainer.global_step == 9


def test_direct_steps_can_be_turned_off() -> None:
    _, module = _fit([], ("trainer.direct_steps=false", "trainer.max_epochs=1"))
    assert not module._direct


def test_auto_threads_give_small_models_one_thread() -> None:
    small = compose(["data=average", "model.hidden_size=20"])
    large = compose(["data=average", "model.hidden_size=512", "data.batch_size=64"])

    assert lstm_work(small) < THREADED_WORK <= lstm_work(large)
    assert torch_threads("auto", lstm_work(small)) == 1
    cores = len(os.sched_getaffinity(0))
    assert torch_threads("auto", lstm_work(large)) == cores  # no sweep: every core
    assert torch_threads(3, lstm_work(small)) == 3  # a number is taken as given


@pytest.mark.parametrize(
    ("override", "ok"),
    [
        ("trainer.limit_train_batches=null", True),
        ("trainer.limit_train_batches=5", True),
        ("trainer.limit_train_batches=0.25", True),
        ("trainer.limit_train_batches=0", False),  # no training at all
        ("trainer.limit_train_batches=0.0", False),
        ("trainer.limit_train_batches=1.5", False),
        ("trainer.limit_val_batches=0", True),  # skips validation
        ("trainer.limit_val_batches=-1", False),
        ("trainer.limit_val_batches=true", False),
        ("trainer.direct_steps=false", True),
        ("trainer.direct_steps=yes", False),
    ],
)
def test_batch_limits_are_checked(override: str, ok: bool) -> None:
    cfg = compose([override])
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            validate(cfg)


def test_limit_train_batches_cuts_the_epoch() -> None:
    cfg = compose([*AVERAGE, "trainer.limit_train_batches=1", "trainer.limit_val_batches=0"])
    data, module = build_module(cfg)
    trainer = build_trainer(cfg, logger=False, callbacks=[])
    trainer.fit(module, data.train, data.val)
    assert trainer.global_step == 2 * 1 * 3  # 2 epochs x 1 batch x 3 windows
    assert "val/loss" not in trainer.callback_metrics


def test_text_codes_read_in_chunks_match_a_whole_file_mapping(tmp_path) -> None:  # noqa: ANN001
    # Over two megabytes, so that the mapping runs in several chunks, the last one partial.
    words = ["tbptt", "lstm", "window", "Hidden", "state!", "\n"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(400_000))
    path = tmp_path / "text.txt"
    path.write_text(text)

    codes, vocab = read_text_codes(path)

    assert codes.dtype == torch.uint8 and len(codes) == len(text) > 2 * (1 << 20)
    assert vocab == sorted(set(text))
    assert "".join(vocab[c] for c in codes[:5000].tolist()) == text[:5000]
    assert "".join(vocab[c] for c in codes[-5000:].tolist()) == text[-5000:]


@pytest.mark.slow
def test_auto_threads_share_the_cores_among_joblib_workers(run_train, tracking_uri) -> None:  # noqa: ANN001
    from mlflow.tracking import MlflowClient

    # hidden 1024 in batches of 8 is 2^25 multiply-adds a step: worth four threads alone.
    big = ["model.hidden_size=1024", "trainer.num_threads=auto", "trainer.max_epochs=1"]
    alone = run_train(*big, "logger.experiment_name=alone")
    assert alone.returncode == 0, alone.stderr[-3000:]
    pair = run_train(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *big,
        "logger.experiment_name=pair",
    )  # fmt: skip
    assert pair.returncode == 0, pair.stderr[-3000:]

    client = MlflowClient(tracking_uri)

    def threads(experiment: str) -> list[int]:
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        return [int(r.data.tags["torch.num_threads"]) for r in runs if "torch.num_threads"
                in r.data.tags]

    cores = len(os.sched_getaffinity(0))
    assert threads("alone") == [min(cores, 4)]
    # Each of two workers gets half the cores: the launcher's n_jobs reached the job.
    assert threads("pair") == [max(1, min(cores // 2, 4))] * 2


# --hydra-help composes no app config, so it takes no app override (in Hydra's own help too).
@pytest.mark.parametrize("args", [["data=adding", "--help"], ["--hydra-help"]])
def test_help_with_a_shared_repository_is_hydras_own(args: list[str]) -> None:
    # `python -m src.train` shares one config repository while the help lists the groups;
    # importing the module and calling main() runs Hydra's help as it comes.
    plain = "import sys; sys.argv[0] = 'train.py'; import src.train; src.train.main()"
    env = subprocess_env()
    ours = subprocess.run([sys.executable, "-m", "src.train", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    hydras = subprocess.run([sys.executable, "-c", plain, *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)

    assert ours.returncode == hydras.returncode == 0, ours.stderr + hydras.stderr
    # Only the program name in the shell-completion lines may differ.
    assert re.sub(r"python \S+", "python X", ours.stdout) == re.sub(
        r"python \S+", "python X", hydras.stdout
    )
    groups = "data: adding, average, echo, text" if "--help" in args else "hydra/launcher: "
    assert groups in ours.stdout


@pytest.mark.parametrize(
    ("k", "first_target", "carry"),
    [(5, 0, False), (4, 7, True), (3, 12, False), (12, 0, True), (1, 2, False)],
)
def test_back_to_back_windows_run_as_the_general_spans_do(
    k: int, first_target: int, carry: bool
) -> None:
    from src import tbptt
    from src.data import TaskSpec
    from src.model import SequenceLSTM

    spec = TaskSpec("average", "features", 3, 2, "mse", "val/rmse")
    torch.manual_seed(0)
    x, y = torch.randn(4, 12, 3), torch.randn(4, 12, 2)
    hidden = (torch.randn(1, 4, 6), torch.randn(1, 4, 6)) if carry else None
    runs = []
    for run in (tbptt.run_updates, tbptt._run_spans):  # the fast path, then the general one
        torch.manual_seed(1)
        model = SequenceLSTM(spec, hidden_size=6)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(loss: torch.Tensor, update: tbptt.Update, optimizer=optimizer) -> None:  # noqa: ANN001
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        schedule = tbptt.fixed_schedule(12, k)
        losses, final = run(model, x, y, schedule, torch.nn.functional.mse_loss, step,
                            hidden, first_target)
        runs.append((losses, final, [p.detach().clone() for p in model.parameters()]))

    (fast_losses, fast_final, fast_params), (losses, final, params) = runs
    assert len(fast_losses) == len(losses) == len([w for w in schedule if w.end > first_target])
    torch.testing.assert_close(fast_losses, losses)
    torch.testing.assert_close(fast_final, final)
    torch.testing.assert_close(fast_params, params)


class Stop(Callback):
    """Reads the garbage collector's frozen count mid-training, then fails the fit."""

    def __init__(self) -> None:
        self.frozen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.frozen = gc.get_freeze_count()
        raise RuntimeError("stop here")


def test_set_up_objects_are_frozen_while_training_only() -> None:
    _fit([])
    assert gc.get_freeze_count() == 0

    stop = Stop()
    with pytest.raises(RuntimeError, match="stop here"):
        _fit([stop])
    assert stop.frozen > 10_000  # the imports and the set-up, out of the collector's passes
    assert gc.get_freeze_count() == 0  # handed back, even though the fit failed
