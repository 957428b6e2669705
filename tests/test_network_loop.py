"""NetworkLoop: sockets, timers and tickers on one thread (no broker needed)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from edge_agent.transport.network_loop import TICK_S, NetworkLoop
from tests.descriptor_support import descriptors_above
from tests.fleet_support import wait_for

WAIT_S = 5.0


@pytest.fixture
def loop() -> Iterator[NetworkLoop]:
    instance = NetworkLoop(name="test-net")
    instance.start()
    yield instance
    instance.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.setblocking(False)
    yield left, right
    left.close()
    right.close()


def test_call_soon_runs_on_the_loop_thread(loop: NetworkLoop) -> None:
    ran = threading.Event()
    seen: list[bool] = []

    def call() -> None:
        seen.append(loop.in_loop())
        ran.set()

    loop.call_soon(call)
    assert ran.wait(WAIT_S)
    assert seen == [True]
    assert not loop.in_loop()


def test_call_later_runs_in_time_order_and_cancel_prevents(loop: NetworkLoop) -> None:
    order: list[str] = []
    done = threading.Event()
    started = time.monotonic()
    loop.call_later(0.2, lambda: order.append("late"))
    skipped = loop.call_later(0.1, lambda: order.append("cancelled"))
    loop.call_later(0.05, lambda: order.append("early"))
    loop.call_later(0.3, done.set)
    skipped.cancel()
    assert done.wait(WAIT_S)
    assert order == ["early", "late"]
    assert time.monotonic() - started >= 0.3


def test_readable_socket_calls_back_until_unwatched(
    loop: NetworkLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    left, right = pair
    received: list[bytes] = []
    got = threading.Event()

    def on_ready(readable: bool, _writable: bool) -> None:
        if readable:
            received.append(left.recv(100))
            got.set()

    loop.watch(left, on_ready)
    right.send(b"ping")
    assert got.wait(WAIT_S)
    assert received == [b"ping"]

    loop.unwatch(left)
    got.clear()
    right.send(b"again")
    assert not got.wait(0.3)
    assert left.recv(100) == b"again"  # still there: nobody read it


def test_writability_is_watched_only_on_request(
    loop: NetworkLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    left, _right = pair
    writable = threading.Event()
    wanted = [True]

    def on_ready(_readable: bool, is_writable: bool) -> None:
        if is_writable:
            writable.set()
            loop.set_writable(left, False)

    loop.watch(left, on_ready)
    assert not writable.wait(0.3)
    loop.set_writable(left, lambda: wanted[0])  # a predicate is evaluated under the lock
    assert writable.wait(WAIT_S)
    writable.clear()
    wanted[0] = False
    loop.set_writable(left, lambda: wanted[0])
    assert not writable.wait(0.3)


def test_a_failing_callback_is_logged_and_the_loop_goes_on(
    loop: NetworkLoop, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    after = threading.Event()
    with caplog.at_level(logging.ERROR, logger="edge_agent.transport.network_loop"):
        loop.call_soon(boom)
        loop.call_soon(after.set)
        assert after.wait(WAIT_S)
    assert "a callback failed" in caplog.text
    assert loop.running


def test_tickers_run_about_every_tick_until_removed(loop: NetworkLoop) -> None:
    ticks: list[float] = []
    ticker = loop.add_ticker(lambda: ticks.append(time.monotonic()))
    wait_for(lambda: len(ticks) >= 2, timeout=4 * TICK_S, what="two ticks")
    assert ticks[1] - ticks[0] >= 0.9 * TICK_S
    loop.remove_ticker(ticker)
    count = len(ticks)
    # A ticker added now has run twice only after a whole tick has passed since the
    # removal: time enough for the removed one to run again had it stayed.
    later: list[float] = []
    loop.add_ticker(lambda: later.append(time.monotonic()))
    wait_for(lambda: len(later) >= 2, timeout=4 * TICK_S, what="a later ticker's two ticks")
    assert len(ticks) <= count + 1  # one may have been under way


def test_close_joins_the_thread_and_is_final() -> None:
    loop = NetworkLoop(name="test-close")
    loop.start()
    loop.start()  # idempotent
    was_running = loop.running
    loop.close()
    loop.close()  # idempotent
    assert (was_running, loop.running, loop.closed) == (True, False, True)
    assert not any(t.name == "test-close" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        loop.start()


def test_descriptors_above_select_limit_are_watched(loop: NetworkLoop) -> None:
    """select() refuses descriptors >= 1024; the loop uses epoll and does not care."""
    with descriptors_above(1100):
        left, right = socket.socketpair()
        try:
            assert left.fileno() > 1024
            got = threading.Event()
            loop.watch(left, lambda readable, _w: got.set() if readable else None)
            right.send(b"x")
            assert got.wait(WAIT_S)
            loop.unwatch(left)
        finally:
            left.close()
            right.close()


def test_a_loop_that_never_started_holds_no_descriptors(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Links build a private loop up front; one never started must leak nothing."""
    before = len(os.listdir("/proc/self/fd"))
    loop = NetworkLoop(name="never-started")
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(RuntimeError, match="not started"):
        loop.watch(pair[0], lambda _r, _w: None)
    loop.close()
