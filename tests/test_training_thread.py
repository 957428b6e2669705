"""TrainingThread (edge_agent.training.training_thread): one job at a time, off the caller's thread.

Jobs are held with events, never with sleeps: a test releases a job when it has
checked what must hold while the job runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from edge_agent.training.training_thread import Done, TrainingThread

WAIT_S = 30.0


def held(release: threading.Event, started: threading.Event, value: str) -> Callable[[], str]:
    def job() -> str:
        started.set()
        assert release.wait(WAIT_S)
        return value

    return job


def test_no_thread_until_the_first_job() -> None:
    before = {t.name for t in threading.enumerate()}
    thread: TrainingThread[str] = TrainingThread("train-idle")
    assert "train-idle" not in {t.name for t in threading.enumerate()} - before
    assert not thread.busy
    assert thread.wait_idle(0.0)
    assert thread.take() == []
    assert thread.close(WAIT_S)


def test_a_job_runs_on_the_thread_and_its_result_is_taken_once() -> None:
    woken = threading.Event()
    thread: TrainingThread[str] = TrainingThread("train-a", on_done=woken.set)
    ticket = thread.submit(lambda: threading.current_thread().name)
    assert woken.wait(WAIT_S)
    assert thread.wait_idle(WAIT_S)
    assert thread.take() == [Done(ticket, result="train-a")]
    assert thread.take() == []
    assert thread.close(WAIT_S)


def test_a_waiting_job_is_replaced_and_never_runs() -> None:
    release, started = threading.Event(), threading.Event()
    thread: TrainingThread[str] = TrainingThread("train-b")
    first = thread.submit(held(release, started, "first"))
    assert started.wait(WAIT_S)
    ran: list[str] = []

    def replaced() -> str:
        ran.append("second")
        return "second"

    second = thread.submit(replaced)
    third = thread.submit(lambda: "third")
    assert first < second < third
    assert thread.busy
    release.set()
    assert thread.wait_idle(WAIT_S)
    assert thread.take() == [Done(first, result="first"), Done(third, result="third")]
    assert ran == []
    assert thread.close(WAIT_S)


def test_a_job_that_raises_is_reported_and_the_thread_goes_on() -> None:
    thread: TrainingThread[str] = TrainingThread("train-c")

    def broken() -> str:
        raise ValueError("bad job")

    failed = thread.submit(broken)
    assert thread.wait_idle(WAIT_S)
    ok = thread.submit(lambda: "fine")
    assert thread.wait_idle(WAIT_S)
    done = thread.take()
    assert [d.ticket for d in done] == [failed, ok]
    assert isinstance(done[0].error, ValueError)
    assert done[0].result is None
    assert done[1] == Done(ok, result="fine")
    assert thread.close(WAIT_S)


def test_a_job_that_exits_is_reported_and_the_thread_goes_on() -> None:
    """sys.exit() in a user's model module must not end training on the device for good."""
    thread: TrainingThread[str] = TrainingThread("train-exit")

    def exits() -> str:
        raise SystemExit(2)

    failed = thread.submit(exits)
    assert thread.wait_idle(WAIT_S)
    ok = thread.submit(lambda: "fine")
    assert thread.wait_idle(WAIT_S)
    done = thread.take()
    assert [d.ticket for d in done] == [failed, ok]
    assert isinstance(done[0].error, RuntimeError)
    assert "SystemExit(2)" in str(done[0].error)
    assert done[1] == Done(ok, result="fine")
    assert thread.close(WAIT_S)


def test_a_failing_wake_callback_does_not_stop_the_thread() -> None:
    def wake() -> None:
        raise RuntimeError("no worker")

    thread: TrainingThread[int] = TrainingThread("train-d", on_done=wake)
    thread.submit(lambda: 1)
    assert thread.wait_idle(WAIT_S)
    thread.submit(lambda: 2)
    assert thread.wait_idle(WAIT_S)
    assert [d.result for d in thread.take()] == [1, 2]
    assert thread.close(WAIT_S)


def test_close_abandons_a_running_job_and_refuses_new_ones() -> None:
    release, started = threading.Event(), threading.Event()
    thread: TrainingThread[str] = TrainingThread("train-e")
    thread.submit(held(release, started, "late"))
    assert started.wait(WAIT_S)
    assert thread.wait_idle(0.01) is False
    assert thread.close(0.01) is False  # abandoned, still running
    with pytest.raises(RuntimeError, match="closed"):
        thread.submit(lambda: "more")
    release.set()
    assert thread.close(WAIT_S) is True  # idempotent: now it has ended
    assert thread.take() == []  # an abandoned job's result is never handed over
