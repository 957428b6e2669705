"""One background thread for local training, so the agent's worker never waits on an epoch.

The agent's worker thread owns all of the agent's state and must stay responsive:
deploys, chunk repairs and telemetry go on while a device trains. A
:class:`TrainingThread` runs the slow part of a round (loading the local data,
``trainer.fit`` / ``trainer.evaluate``, encoding the update) and hands the outcome
back; the worker sends it. Workflow::

    thread = TrainingThread("train-dev-1", on_done=wake_the_worker)
    ticket = thread.submit(job)            # worker: queue a job (a callable)
    ...                                    # training thread: runs job(), calls on_done()
    for done in thread.take():             # worker: finished jobs, in order
        if done.ticket == current: use(done.result)   # a stale ticket's result is dropped
    thread.close(timeout=5.0)              # shutdown: wait that long, then abandon

Rules:

* one job at a time, on one thread (started with the first job, so an agent that
  never trains has none); at most one job waits: submitting replaces a job that has
  not started yet (it never runs);
* a running job cannot be interrupted (an epoch of a trainer): whoever submitted it
  recognises its result as stale by the ticket and drops it;
* a job that raises is reported as :attr:`Done.error` (the thread goes on); so is
  one that raises ``SystemExit`` or another ``BaseException`` (user code calling
  ``sys.exit()``, argparse on import), as a ``RuntimeError`` naming it;
* the thread is a daemon: :meth:`close` waits for a running job at most ``timeout``
  seconds and then abandons it, so stopping an agent never hangs on training.

Only the submitter's thread calls :meth:`submit`, :meth:`take` and :meth:`close`;
``on_done`` is called on the training thread and must be quick (it wakes the worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Done", "TrainingThread"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Done(Generic[T]):
    """A finished job: its ticket, and its result or the exception it raised."""

    ticket: int
    result: T | None = None
    error: Exception | None = None


class TrainingThread(Generic[T]):
    """Runs submitted jobs one at a time on one daemon thread (see the module docstring).

    Args:
        name: The thread's name (logs, debuggers).
        on_done: Called on the training thread after each job ends.
    """

    def __init__(self, name: str, *, on_done: Callable[[], None] = _nothing) -> None:
        self._name = name
        self._on_done = on_done
        self._cond = threading.Condition()
        self._waiting: tuple[int, Callable[[], T]] | None = None
        self._running: int | None = None
        self._done: deque[Done[T]] = deque()
        self._tickets = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether a job is running or waiting."""
        with self._cond:
            return self._waiting is not None or self._running is not None

    def submit(self, job: Callable[[], T]) -> int:
        """Queue ``job``, replacing a job that has not started.

        Returns:
            The job's ticket (increasing), found again in its :class:`Done`.

        Raises:
            RuntimeError: the thread was closed.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            self._tickets += 1
            if self._waiting is not None:
                logger.debug("%s: job %d replaced before it started", self._name, self._waiting[0])
            self._waiting = (self._tickets, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return self._tickets

    def take(self) -> list[Done[T]]:
        """The jobs finished since the last call, oldest first (never blocks)."""
        with self._cond:
            done = list(self._done)
            self._done.clear()
            return done

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs or waits (at most ``timeout`` seconds).

        Returns:
            Whether the thread is idle.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._waiting is not None or self._running is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float) -> bool:
        """Drop a waiting job, and wait at most ``timeout`` seconds for a running one.

        Idempotent. A job still running after ``timeout`` is abandoned (the thread is
        a daemon; its result is never taken).

        Returns:
            Whether the thread has stopped.
        """
        with self._cond:
            self._closed = True
            self._waiting = None
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(
                "%s: a training job still runs after %g s (abandoned)", self._name, timeout
            )
            return False
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                assert self._waiting is not None
                ticket, job = self._waiting
                self._waiting = None
                self._running = ticket
            try:
                done: Done[T] = Done(ticket, result=job())
            except Exception as exc:  # reported to the submitter, never fatal
                logger.exception("%s: job %d failed", self._name, ticket)
                done = Done(ticket, error=exc)
            except BaseException as exc:  # noqa: BLE001 - e.g. sys.exit() in a user's model module
                logger.error("%s: job %d raised %r", self._name, ticket, exc)
                done = Done(ticket, error=RuntimeError(f"the job raised {exc!r}"))
            with self._cond:
                self._running = None
                if not self._closed:
                    self._done.append(done)
                self._cond.notify_all()
            try:
                self._on_done()
            except Exception:  # a broken callback must not stop training
                logger.exception("%s: on_done failed", self._name)
