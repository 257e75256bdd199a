"""The training benchmark on a GPU: a larger LSTM, the project against a plain PyTorch loop.

    .venv/bin/python benchmarks/bench_gpu.py             # needs CUDA; a minute or two
    .venv/bin/python benchmarks/bench_gpu.py --reps 5
    .venv/bin/python benchmarks/bench_gpu.py --dry-run  # the same code on the CPU, tiny: a check

The workload: the `average` task with LSTM 10 -> 512 -> 5, batches of 64 sequences of 100 steps,
k = 10, Adam at 1e-3, 100 batches: 1,000 optimizer steps. Both trainers start from the same
weights and see the batches in the same order; fp32 on both sides (cuDNN's LSTM), so their losses
must agree. A third row times the project at its GPU default, bf16-mixed, for reference: its
loss differs by the rounding of bf16.

One warm-up run of each comes first (CUDA context, cuDNN plans); then the trainers alternate.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from bench_train import REPO, Trial, clocked, quiet_lightning, silenced  # noqa: E402

HIDDEN, BATCH, SEQ_LEN, K, BATCHES, LR, SEED = 512, 64, 100, 10, 100, 1e-3, 0
DEVICE = "cuda"


def project_config(precision: str):  # noqa: ANN201
    from hydra import compose, initialize_config_dir

    from src.config import validate

    overrides = [
        "trainer=gpu" if DEVICE == "cuda" else "trainer=cpu",
        f"trainer.precision={precision}",
        "data=average",
        f"data.n_train={BATCH * BATCHES}",
        f"data.seq_len={SEQ_LEN}",
        f"data.batch_size={BATCH}",
        f"model.hidden_size={HIDDEN}",
        f"tbptt.k={K}",
        f"optimizer.lr={LR}",
        f"seed={SEED}",
        "trainer.max_epochs=1",
        "trainer.gradient_clip_val=null",  # the plain loop does not clip
        "trainer.limit_val_batches=0",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate(cfg)
    return cfg


def run_project(cfg, label: str) -> Trial:  # noqa: ANN001
    import torch
    from plain_loop import mse_on

    from src.train import build_module, build_trainer

    data, module = build_module(cfg)
    with silenced(), clocked() as clock:
        trainer = build_trainer(cfg, logger=False, callbacks=[])
        trainer.fit(module, data.train, data.val)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    loss = mse_on(module.model.cpu(), data.train.x, data.train.y)
    return Trial(label, torch.get_num_threads(), clock, trainer.global_step, loss)


def run_plain(inputs, targets, init_state) -> Trial:  # noqa: ANN001
    import plain_loop
    import torch

    device = torch.device(DEVICE)
    model = plain_loop.LSTMRegressor(inputs.shape[-1], HIDDEN, targets.shape[-1])
    model.load_state_dict(init_state)
    model.to(device)
    x, y = inputs.to(device), targets.to(device)
    with clocked() as clock:
        steps = plain_loop.train(model, x, y, K, 1, BATCH, LR, SEED, fused=True)
    loss = plain_loop.mse_on(model.cpu(), inputs, targets)
    return Trial("plain", torch.get_num_threads(), clock, steps, loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="CPU, hidden 32, 5 batches")
    args = parser.parse_args(argv)

    import torch

    global DEVICE, HIDDEN, BATCHES
    if args.dry_run:
        DEVICE, HIDDEN, BATCHES = "cpu", 32, 5
    elif not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    quiet_lightning()

    from src.train import build_module

    fp32, bf16 = project_config("32-true"), project_config("bf16-mixed")
    data, module = build_module(fp32)
    inputs, targets = data.train.x, data.train.y
    init_state = copy.deepcopy(module.model.state_dict())
    runners = {
        "project": lambda: run_project(fp32, "project"),
        "plain": lambda: run_plain(inputs, targets, init_state),
        "project, bf16-mixed": lambda: run_project(bf16, "project, bf16-mixed"),
    }
    for runner in runners.values():
        runner()  # warm-up

    trials: dict[str, list[Trial]] = {name: [] for name in runners}
    for rep in range(args.reps):
        for name, runner in runners.items():
            trial = runner()
            trials[name].append(trial)
            print(f"  rep {rep + 1}/{args.reps} {name:<20} {trial.steps / trial.clock.wall:8.1f} "
                  f"steps/s  loss {trial.loss:.6f}", file=sys.stderr, flush=True)

    rate = {name: statistics.median(t.steps / t.clock.wall for t in group)
            for name, group in trials.items()}
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run)"
    print(f"Device: {device}, torch {torch.__version__}\n")
    print(f"| trainer (LSTM 10 -> {HIDDEN} -> 5, batch {BATCH}, k {K}) | steps | steps/s "
          "| vs plain | final loss |")
    print("|---|---:|---:|---:|---:|")
    for name, group in trials.items():
        print(f"| {name} | {group[0].steps} | {rate[name]:.0f} | "
              f"{rate[name] / rate['plain']:.2f}x | "
              f"{statistics.median(t.loss for t in group):.6f} |")
    same = abs(trials["project"][0].loss - trials["plain"][0].loss)
    print(f"\nfp32 losses differ by {same:.2e}; steps: "
          f"{sorted({g[0].steps for g in trials.values()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
