"""Several workers on one study: a lock around count-and-ask, and heartbeats for their trials.

The same sweep command started in N processes (on one host or many) shares one study through
its storage. Optuna keeps trial numbers distinct by itself, but two things need help:

- Stopping at n_trials. A worker counts the study's trials and asks for as many as are left;
  two workers that count at the same moment both ask, and the study overshoots. So the count
  and the ask run under a lock that every worker of the study takes: a PostgreSQL advisory
  lock (keyed by a CRC-32 of the study name, the same in every process, unlike `hash`) on a
  PostgreSQL storage, an exclusive `flock` on a file beside a journal or SQLite file.
- Workers that die. A worker killed in the middle of a trial leaves it RUNNING for ever. On a
  database storage each worker beats the heart of its running trials from a thread; before
  each ask a worker fails the trials whose heart stopped (`optuna.storages.fail_stale_trials`)
  and Optuna queues a copy of each (`RetryHeartbeatStaleTrialCallback`), which the next ask
  picks up. Optuna's journal storage has no heartbeats: there the sweeper fails the trials of
  dead processes on its own host (`OptunaSweep.release_orphans`), so a journal file suits
  workers on one host.

Optuna and SQLAlchemy are imported inside functions: Hydra imports this module at start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

_engines: dict[str, Any] = {}


def lock_key(name: str) -> int:
    """A 32-bit key for `name` that every process on every host computes alike."""
    return zlib.crc32(name.encode())


@contextlib.contextmanager
def study_lock(storage: str, name: str) -> Iterator[None]:
    """Hold a lock that every worker of the study stored in `storage` contends for.

    Args:
        storage: The study's storage, as the sweeper resolved it: an absolute journal path
            or a database URL.
        name: What the lock guards, e.g. the study name; the same name, the same lock.
    """
    if storage.startswith("postgresql"):
        with _advisory_lock(storage, lock_key(name)):
            yield
        return
    path = _file_of(storage)
    if path is None:
        # TODO: MySQL has GET_LOCK; until it is used here, workers on a MySQL storage can
        # overshoot n_trials by a trial or two.
        yield
        return
    # A file of its own: the journal backend locks the journal's own `.lock` file.
    lock_path = path.with_name(path.name + ".ask.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_of(storage: str) -> Path | None:
    if storage.startswith("sqlite:///"):
        path = storage.removeprefix("sqlite:///")
        return Path(path) if path and path != ":memory:" else None
    if "://" in storage:
        return None
    return Path(storage)


@contextlib.contextmanager
def _advisory_lock(url: str, key: int) -> Iterator[None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    # No pool: the lock belongs to a database session, and a closed connection ends it, so
    # a worker that dies while it holds the lock cannot keep the others waiting.
    engine = _engines.get(url)
    if engine is None:
        engine = _engines[url] = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()


def heartbeat_storage_kwargs(
    heartbeat_interval: int | None,
    grace_period: int | None,
    max_retry: int | None,
    on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> dict[str, Any]:
    """`RDBStorage` arguments that turn heartbeats on; empty when `heartbeat_interval` is None.

    A stale trial is failed and a copy of it queued (up to `max_retry` times per trial), after
    `on_stale` has seen it.
    """
    if heartbeat_interval is None:
        return {}
    import warnings

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning("Trial %d stopped beating (its worker died?): failed, and queued again.",
                    trial.number)
        if on_stale is not None:
            try:
                on_stale(study, trial)
            except Exception as error:  # a retry must not depend on the tracking server
                log.warning("Could not end the run of stale trial %d: %s", trial.number, error)
        retry(study, trial)

    return {
        "heartbeat_interval": heartbeat_interval,
        # Optuna wants the grace period longer than the interval; two beats is the least.
        "grace_period": grace_period or 2 * heartbeat_interval,
        "heartbeat_stale_trial_callback": stale,
    }


def heartbeats_on(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and queue again) the trials whose worker stopped beating their heart."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class Heartbeat:
    """Beats the heart of some trials from a thread while they run (a `with` block).

    Beating from the sweeper rather than from the job: the sweeper is what tells the study
    how a trial ended, so a trial is alive exactly while its sweeper is.
    """

    def __init__(self, study: optuna.Study, trial_ids: list[int]) -> None:
        self.storage = study._storage
        self.trial_ids = list(trial_ids)
        self.interval = self.storage.get_heartbeat_interval() if heartbeats_on(study) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        for trial_id in self.trial_ids:
            try:
                self.storage.record_heartbeat(trial_id)
            except Exception as error:  # a missed beat is retried; the grace period covers it
                log.debug("heartbeat of trial id %d failed: %s", trial_id, error)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> Heartbeat:
        if self.interval is not None and self.trial_ids:
            self.beat()
            self._thread = threading.Thread(target=self._run, name="optuna-heartbeat",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
