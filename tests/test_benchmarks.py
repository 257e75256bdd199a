"""The training benchmark runs end to end, and its three trainers do the same work.

No timing is asserted: the machine is shared. What must hold on any machine is that the project,
the naive recipe and the plain loop make the same number of optimizer steps and end with the
same loss, or the speed figures compare different work.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env


@pytest.mark.slow
def test_bench_train_smallest_run_agrees_on_the_loss() -> None:
    command = [
        sys.executable, "benchmarks/bench_train.py", "--only", "train", "--workloads", "seed",
        "--reps", "1", "--epochs", "1", "--sequences", "30",
    ]  # fmt: skip
    out = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]

    rows = {}
    for line in out.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0].startswith("LSTM 10 -> 20 -> 5"):
            rows[cells[1]] = cells
    assert {"project", "naive", "plain (best)"} <= set(rows), out.stdout

    # 30 sequences in batches of 10, 100 steps in windows of 10: 30 optimizer steps each.
    assert {row[3] for row in rows.values()} == {"30"}
    losses = [float(row[8]) for row in rows.values()]
    assert max(losses) - min(losses) <= 1e-3 * min(losses), rows
    assert "MISMATCH" not in out.stdout
    assert re.search(r"^Targets: train: (met|NOT met)$", out.stdout, re.MULTILINE)
