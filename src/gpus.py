"""One GPU per worker: workers on one host each claim a free GPU by a lock in a shared folder.

Docker gives every replica of a service that reserves `count: 1` GPU the same first GPU, and
workers started by hand all default to `cuda:0`. So each worker that sees several GPUs takes
an exclusive `flock` on `<lock_dir>/gpu<i>.lock` for the first GPU that no one else holds, and
keeps it while the process lives: the kernel releases it when the process ends, even on
kill -9, so a crashed worker's GPU is free for the next one at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

# The open lock file of the GPU this process holds; closing it would release the claim.
_claimed: tuple[int, IO[bytes]] | None = None


class NoFreeGPUError(RuntimeError):
    """Every GPU is claimed by another worker."""


def claim_gpu(lock_dir: str | os.PathLike[str], n_gpus: int) -> int:
    """The index of a GPU that no other worker holds, claimed until this process ends.

    A process that already holds a GPU gets the same one again: a sweep runs its trials one
    after another in one process.

    Raises:
        NoFreeGPUError: All `n_gpus` GPUs are held by other processes.
    """
    global _claimed
    if _claimed is not None:
        return _claimed[0]
    if n_gpus < 1:
        raise NoFreeGPUError(f"no GPU is visible to claim (torch sees {n_gpus}).")

    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(n_gpus):
        handle = open(folder / f"gpu{index}.lock", "ab")  # noqa: SIM115 (held until exit)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _claimed = (index, handle)
        return index
    raise NoFreeGPUError(
        f"all {n_gpus} GPUs are claimed by other workers (locks in {folder}); start at most "
        f"one worker per GPU, e.g. `docker compose ... up --scale trainer={n_gpus}`."
    )
