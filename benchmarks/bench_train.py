"""Speed, start-up, memory and parallel trials of tbptt-lab, measured against two baselines.

    .venv/bin/python benchmarks/bench_train.py             # every section: 9 minutes, 2 cores
    .venv/bin/python benchmarks/bench_train.py --quick     # fewer repetitions: 3 minutes
    .venv/bin/python benchmarks/bench_train.py --only train --workloads seed,k1

Sections (`--only` picks some):

- train: three trainers on one workload, in this process, interleaved repetition by
  repetition; the medians of their optimizer steps per second and the ratios.
    project  the real path of `python -m src.train`: `build_module` and `build_trainer` of
             src/train.py on the composed configs, without MLflow (`logger=False`) and without
             checkpoints (the baselines write neither);
    naive    Lightning's TBPTT recipe re-created (benchmarks/naive_recipe.py), at the thread
             count the project chose (at torch's default of every core it was up to 50 times
             slower on a busy 2-core machine);
    plain    a hand-written PyTorch loop with fused Adam (benchmarks/plain_loop.py), at 1 thread
             and at every core; its best is the reference figure.
  All three start from the project's initial weights and see the batches in the same order, so
  the loss of each trained model on the training set must agree: none is faster by doing less.
- startup: `python -m src.train --help` and a config error against `python -c "import torch"`.
- memory: peak resident memory of a text run in stream mode, 10^5 against 10^7 characters.
- parallel: a grid sweep through the real command with joblib, n_jobs=1 against n_jobs=2.

The tables go to stdout as markdown, ready for BENCHMARKS.md; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

SECTIONS = ("train", "startup", "memory", "parallel")

# The seed's workload: 300 sequences of 100 steps with 10 features, batches of 10, Adam at 1e-3.
N_SEQUENCES, SEQ_LEN, BATCH_SIZE, LR, SEED = 300, 100, 10, 1e-3, 0

# Losses of the trained models may differ by float rounding (fused against unfused Adam).
LOSS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Workload:
    name: str
    hidden_size: int
    k: int
    epochs: int  # the seed's 5; the others enough for a second or two of training
    what: str
    sequences: int = N_SEQUENCES


WORKLOADS = {
    w.name: w
    for w in [
        Workload("seed", 20, 10, 5, "LSTM 10 -> 20 -> 5, k = 10 (the seed's)"),
        Workload("k1", 20, 1, 1, "k = 1: a step per time step"),
        Workload("k100", 20, 100, 10, "k = 100: full BPTT, a step per batch"),
        Workload("h256", 256, 10, 1, "hidden 256, k = 10, 100 sequences", sequences=100),
    ]
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quiet_lightning() -> None:
    """No banners or tips from Lightning, and no warnings: the tables are the output."""
    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels when imported)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Progress bars and banners of both Lightning trainers go nowhere, at the same cost."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull):
        yield


# ---- train -------------------------------------------------------------------------------


@dataclass
class Clock:
    wall: float = 0.0
    cpu: float = 0.0  # CPU seconds of this process, all its threads


@contextlib.contextmanager
def clocked() -> Iterator[Clock]:
    clock = Clock()
    wall, cpu = time.perf_counter(), time.process_time()
    yield clock
    clock.wall, clock.cpu = time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Trial:
    trainer: str
    threads: int
    clock: Clock
    steps: int
    loss: float


def project_config(workload: Workload, epochs: int, n_sequences: int):  # noqa: ANN201
    from hydra import compose, initialize_config_dir

    from src.config import validate

    overrides = [
        "data=average",
        f"data.n_train={n_sequences}",
        f"data.seq_len={SEQ_LEN}",
        f"data.batch_size={BATCH_SIZE}",
        f"model.hidden_size={workload.hidden_size}",
        f"tbptt.k={workload.k}",
        f"optimizer.lr={LR}",
        f"seed={SEED}",
        f"trainer.max_epochs={epochs}",
        # The baselines neither clip (the project clips at 1.0 by default) nor validate.
        "trainer.gradient_clip_val=null",
        "trainer.limit_val_batches=0",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate(cfg)
    return cfg


def run_project(cfg) -> tuple[Trial, object]:  # noqa: ANN001
    import torch
    from plain_loop import mse_on

    from src.train import build_module, build_trainer

    data, module = build_module(cfg)
    with silenced(), clocked() as clock:
        trainer = build_trainer(cfg, logger=False, callbacks=[])
        trainer.fit(module, data.train, data.val)
    loss = mse_on(module.model, data.train.x, data.train.y)
    return Trial("project", torch.get_num_threads(), clock, trainer.global_step, loss), module


def run_naive(workload: Workload, epochs: int, inputs, targets, init_state, threads: int) -> Trial:  # noqa: ANN001
    import lightning.pytorch as pl
    import torch
    from naive_recipe import NaiveTBPTT, SequenceDataset
    from plain_loop import mse_on

    torch.set_num_threads(threads)
    model = NaiveTBPTT(
        SequenceDataset(inputs, targets), workload.hidden_size, workload.k, BATCH_SIZE, LR, SEED
    )
    model.load_project_weights(init_state)
    with silenced(), clocked() as clock:
        # Lightning's defaults, but nothing written to disk, like the other two.
        trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False)
        trainer.fit(model)
    loss = mse_on(model, inputs, targets)
    return Trial("naive", threads, clock, trainer.global_step, loss)


def run_plain(workload: Workload, epochs: int, inputs, targets, init_state, threads: int) -> Trial:  # noqa: ANN001
    import plain_loop
    import torch

    torch.set_num_threads(threads)
    model = plain_loop.LSTMRegressor(inputs.shape[-1], workload.hidden_size, targets.shape[-1])
    model.load_state_dict(init_state)
    with clocked() as clock:
        steps = plain_loop.train(
            model, inputs, targets, workload.k, epochs, BATCH_SIZE, LR, SEED, fused=True
        )
    loss = plain_loop.mse_on(model, inputs, targets)
    return Trial(f"plain@{threads}", threads, clock, steps, loss)


def probe_threads(baseline: tuple, cores: int) -> tuple[list[int], list[str]]:
    """Thread counts worth timing: each is tried on the plain loop over 5 batches first.

    On a busy machine a second thread made small models up to 50 times slower; timing such a
    setting in full would take many minutes and show nothing new.
    """
    import plain_loop
    import torch

    workload, _, inputs, targets, init_state = baseline
    rates = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        model = plain_loop.LSTMRegressor(inputs.shape[-1], workload.hidden_size,
                                         targets.shape[-1])
        model.load_state_dict(init_state)
        n = 5 * BATCH_SIZE
        with clocked() as clock:
            steps = plain_loop.train(
                model, inputs[:n], targets[:n], workload.k, 1, BATCH_SIZE, LR, SEED
            )
        rates[threads] = steps / clock.wall
    best = max(rates.values())
    kept = [t for t, rate in rates.items() if rate >= 0.5 * best]
    notes = [
        f"plain loop at {t} threads: {rate:.0f} steps/s over 5 batches, under half the best "
        f"({best:.0f}); not timed further"
        for t, rate in rates.items()
        if t not in kept
    ]
    return kept, notes


def bench_workload(
    workload: Workload, epochs: int, n_sequences: int, reps: int
) -> tuple[list[Trial], list[str]]:
    import torch

    from src.train import build_module

    cores = len(os.sched_getaffinity(0))
    default_threads = torch.get_num_threads()
    cfg = project_config(workload, epochs, n_sequences)

    # The project's own data and initial weights are the baselines' too, and so is the thread
    # count it chose: the naive recipe is compared at the same one.
    data, module = build_module(cfg)
    project_threads = torch.get_num_threads()
    inputs, targets = data.train.x, data.train.y
    init_state = copy.deepcopy(module.model.state_dict())

    baseline = (workload, epochs, inputs, targets, init_state)
    plain_threads, notes = probe_threads(baseline, cores)
    runners: list[Callable[[], Trial]] = [
        lambda: run_project(cfg)[0],
        lambda: run_naive(*baseline, project_threads),
        *(lambda t=threads: run_plain(*baseline, t) for threads in plain_threads),
    ]

    trials: list[Trial] = []
    for rep in range(reps):
        # Rotate the order so that no trainer always runs first (or after the slowest).
        for runner in runners[rep % len(runners) :] + runners[: rep % len(runners)]:
            trial = runner()
            trials.append(trial)
            say(
                f"  {workload.name} rep {rep + 1}/{reps} {trial.trainer:<10} "
                f"{trial.steps / trial.clock.wall:8.1f} steps/s "
                f"({trial.steps / trial.clock.cpu:8.1f} per CPU-s)  loss {trial.loss:.6f}"
            )
    torch.set_num_threads(default_threads)
    return trials, notes


@dataclass
class Summary:
    workload: Workload
    trainer: str
    threads: int
    steps: int
    steps_per_second: float
    steps_per_cpu_second: float
    loss: float


def summarise(workload: Workload, trials: list[Trial]) -> list[Summary]:
    by_trainer: dict[str, list[Trial]] = {}
    for trial in trials:
        by_trainer.setdefault(trial.trainer, []).append(trial)
    rows = []
    for name, group in by_trainer.items():
        rows.append(
            Summary(
                workload,
                name,
                group[0].threads,
                group[0].steps,
                median([t.steps / t.clock.wall for t in group]),
                median([t.steps / t.clock.cpu for t in group]),
                median([t.loss for t in group]),
            )
        )
    return rows


def train_section(args: argparse.Namespace) -> tuple[str, bool]:
    quiet_lightning()

    lines = [
        "| workload | trainer | threads | steps | steps/s | vs plain | vs naive "
        "| steps/CPU-s | final loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ok = True
    notes: list[str] = []
    for name in args.workloads:
        workload = WORKLOADS[name]
        epochs = args.epochs or workload.epochs
        say(f"train: {workload.name} ({workload.what}), {epochs} epochs x {args.reps} reps")
        sequences = args.sequences or workload.sequences
        trials, probe_notes = bench_workload(workload, epochs, sequences, args.reps)
        notes += [f"{workload.name}: {note}" for note in probe_notes]
        rows = summarise(workload, trials)
        by_name = {row.trainer: row for row in rows}
        project, naive = by_name["project"], by_name["naive"]
        # The plain loop's reference figure is its best thread count.
        plain = max((r for r in rows if r.trainer.startswith("plain")),
                    key=lambda r: r.steps_per_second)
        for row in rows:
            label = "plain (best)" if row is plain else row.trainer.replace("plain@", "plain, ")
            speed = row.steps_per_second
            lines.append(
                f"| {workload.what} | {label} | {row.threads} | {row.steps} | {speed:.0f} | "
                f"{speed / plain.steps_per_second:.2f}x | {speed / naive.steps_per_second:.2f}x | "
                f"{row.steps_per_cpu_second:.0f} | {row.loss:.6f} |"
            )

        losses = [row.loss for row in rows]
        steps = {row.steps for row in rows}
        agree = max(losses) - min(losses) <= LOSS_TOLERANCE * abs(min(losses))
        if not agree or len(steps) != 1:
            ok = False
            lines.append(f"| {name} | **MISMATCH** | | {sorted(steps)} | | | | | {losses} |")
        # Targets: on the seed's workload at least 0.9x the plain loop; on every workload
        # never slower than the naive recipe.
        if name == "seed":
            ok = ok and project.steps_per_second >= 0.9 * plain.steps_per_second
        ok = ok and project.steps_per_second >= naive.steps_per_second
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]), ok


# ---- start-up ------------------------------------------------------------------------------


def wall_time(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, capture_output=True, check=False)
    return time.perf_counter() - started


def child_env(tracking_uri: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["OMP_NUM_THREADS"] = "1"
    env["HYDRA_FULL_ERROR"] = "1"
    return env


def startup_section(args: argparse.Namespace) -> tuple[str, bool]:
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "python -m src.train --help": [sys.executable, "-m", "src.train", "--help"],
        "python -m src.train tbptt.k=0": [sys.executable, "-m", "src.train", "tbptt.k=0"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.startup_reps):
            for name, command in commands.items():
                times[name].append(wall_time(command, Path(tmp), child_env()))
            say(f"startup: rep {rep + 1}/{args.startup_reps}: "
                + ", ".join(f"{times[n][-1]:.2f}s" for n in commands))
    torch_s = median(times['python -c "import torch"'])
    lines = ["| command | median seconds | vs import torch |", "|---|---:|---:|"]
    ok = True
    for name in commands:
        seconds = median(times[name])
        lines.append(f"| `{name}` | {seconds:.2f} | {seconds / torch_s:.2f}x |")
        if name != 'python -c "import torch"':
            ok = ok and seconds <= 0.5 * torch_s
    return "\n".join(lines), ok


# ---- memory ---------------------------------------------------------------------------------

PEAK_RSS = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def write_text(path: Path, n_chars: int) -> None:
    """Tinyshakespeare repeated to `n_chars`, or seeded random words where it is missing."""
    import random

    sources = [REPO / "data" / "tinyshakespeare.txt",
               REPO.parent / "shared" / "data" / "tinyshakespeare.txt"]
    found = [source for source in sources if source.exists()]
    if found:
        text = found[0].read_text()
    else:
        rng = random.Random(0)
        words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 9)))
                 for _ in range(5000)]
        text = " ".join(rng.choices(words, k=20_000)) + "\n"
    path.write_text((text * (n_chars // len(text) + 1))[:n_chars])


def peak_rss_mib(args_: list[str], cwd: Path, env: dict[str, str]) -> float:
    # A wrapper process per run: RUSAGE_CHILDREN reports the largest child it waited for.
    command = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "src.train", *args_]
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def memory_section(args: argparse.Namespace) -> tuple[str, bool]:
    sizes = {"10^5": 10**5, "10^7": 10**7}
    peaks: dict[str, list[float]] = {name: [] for name in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = child_env(f"sqlite:///{tmp_path / 'mlflow.db'}")
        for n_chars in sizes.values():
            write_text(tmp_path / f"text_{n_chars}.txt", n_chars)
        for rep in range(args.memory_reps):
            for name, n_chars in sizes.items():
                run_args = [
                    "data=text",
                    f"data.path={tmp_path / f'text_{n_chars}.txt'}",
                    "tbptt.stream=true",
                    "model.hidden_size=64",
                    "tbptt.k=32",
                    "trainer.max_epochs=1",
                    "trainer.limit_train_batches=20",
                    "trainer.limit_val_batches=5",
                    "trainer.num_threads=1",
                    "trainer.enable_progress_bar=false",
                    "logger.log_checkpoint=false",
                ]
                peaks[name].append(peak_rss_mib(run_args, tmp_path, env))
                say(f"memory: rep {rep + 1}/{args.memory_reps} {name} characters: "
                    f"{peaks[name][-1]:.0f} MiB")
    small, large = median(peaks["10^5"]), median(peaks["10^7"])
    growth = large / small - 1
    lines = [
        "| text (stream mode, hidden 64, k 32, 20 batches) | peak RSS (MiB, median) |",
        "|---|---:|",
        f"| 10^5 characters | {small:.0f} |",
        f"| 10^7 characters | {large:.0f} |",
        f"| growth | {growth * 100:+.1f}% |",
    ]
    return "\n".join(lines), growth <= 0.10


# ---- parallel trials ----------------------------------------------------------------------


def sweep_seconds(n_jobs: int, grid: list[str], cwd: Path, env: dict[str, str]) -> float:
    command = [
        sys.executable, "-m", "src.train", "-m", "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={n_jobs}", f"hydra.sweep.dir={cwd / f'sweep_{n_jobs}'}",
        f"logger.experiment_name=bench-n_jobs-{n_jobs}",
        "trainer.enable_progress_bar=false", "logger.log_checkpoint=false", *grid,
    ]  # fmt: skip
    started = time.perf_counter()
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"the sweep with n_jobs={n_jobs} failed:\n{out.stderr[-3000:]}")
    return seconds


def recorded_threads(tracking_uri: str, experiment_name: str) -> list[str]:
    """The torch thread count each run of an experiment recorded (the `torch.num_threads` tag)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    return sorted(run.data.tags["torch.num_threads"] for run in runs
                  if "torch.num_threads" in run.data.tags)


def parallel_section(args: argparse.Namespace) -> tuple[str, bool]:
    # Trials of 10-20 s on one core (echo, hidden 64, 2048 sequences). The sweep must be long:
    # with n_jobs=2 each worker first spends seconds importing torch, Lightning and MLflow, and
    # the sweep's start and its report cost the same in both; about 20 s in all, which a sweep
    # of three minutes or more (one at a time) amortises well enough for 1.7x.
    grid = [
        "data=echo",
        "data.n_train=2048",
        f"trainer.max_epochs={args.parallel_epochs}",
        "tbptt.k=4,8",
        "seed=" + ",".join(str(seed) for seed in range(args.parallel_trials // 2)),
    ]
    seconds: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = child_env(f"sqlite:///{tmp_path / 'mlflow.db'}")
        # No OMP_NUM_THREADS here: the threads must come from trainer.num_threads=auto.
        env.pop("OMP_NUM_THREADS")
        for rep in range(args.parallel_reps):
            for n_jobs in (1, 2):
                seconds[n_jobs].append(sweep_seconds(n_jobs, grid, tmp_path, env))
                say(f"parallel: rep {rep + 1}/{args.parallel_reps} n_jobs={n_jobs}: "
                    f"{seconds[n_jobs][-1]:.1f}s")
        threads = {n: recorded_threads(env["MLFLOW_TRACKING_URI"], f"bench-n_jobs-{n}")
                   for n in (1, 2)}
    one, two = median(seconds[1]), median(seconds[2])
    trials = args.parallel_trials
    lines = [
        f"| {trials} trials (echo, 2048 sequences, k = 4 and 8, {args.parallel_epochs} epochs) "
        "| wall seconds (median) | speed-up | torch threads per trial |",
        "|---|---:|---:|---|",
        f"| joblib n_jobs=1 | {one:.1f} | 1.00x | {', '.join(sorted(set(threads[1])))} |",
        f"| joblib n_jobs=2 | {two:.1f} | {one / two:.2f}x "
        f"| {', '.join(sorted(set(threads[2])))} |",
    ]
    if args.quick:
        lines.append("\n- --quick: a sweep this short cannot show the 1.7x (the start-up of the "
                     "workers and the report weigh too much); the full run's can.")
    return "\n".join(lines), one / two >= 1.7


# ---- main ---------------------------------------------------------------------------------


def machine() -> str:
    import torch

    load = os.getloadavg()
    return (
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and trials")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    parser.add_argument("--workloads", default=None, help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per trainer")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every workload")
    parser.add_argument("--sequences", type=int, default=None, help="training sequences")
    args = parser.parse_args(argv)

    args.only = [s for s in args.only.split(",") if s]
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        parser.error(f"--only must name sections of {', '.join(SECTIONS)}, but got {unknown}")
    default_workloads = "seed,k1" if args.quick else ",".join(WORKLOADS)
    args.workloads = [w for w in (args.workloads or default_workloads).split(",") if w]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"--workloads must name some of {', '.join(WORKLOADS)}, but got {unknown}")
    args.reps = args.reps or (3 if args.quick else 5)
    args.startup_reps = 3 if args.quick else 7
    args.memory_reps = 1 if args.quick else 2
    args.parallel_reps = 1
    args.parallel_trials = 4 if args.quick else 8
    args.parallel_epochs = 5 if args.quick else 15
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = {
        "train": ("Training speed (optimizer steps per second, medians)", train_section),
        "startup": ("Start-up", startup_section),
        "memory": ("Memory", memory_section),
        "parallel": ("Parallel trials", parallel_section),
    }
    report = [f"Machine: {machine()}", ""]
    verdicts = []
    for name in args.only:
        title, section = sections[name]
        table, ok = section(args)
        verdicts.append(f"{name}: {'met' if ok else 'NOT met'}")
        report += [f"### {title}", "", table, ""]
    report.append("Targets: " + "; ".join(verdicts))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
