"""One network thread driving any number of MQTT connections through epoll.

paho-mqtt's own loop (``loop_start``) spends a thread and ``select()`` per client,
plus a socket pair to wake that thread. ``select()`` cannot watch descriptors above
1023, so a process holding a few hundred connections (``fedge simulate`` with
1,000 agents) breaks. A :class:`NetworkLoop` watches the sockets of many clients
with :mod:`selectors` (epoll on Linux, no descriptor ceiling) from one thread, and
runs timers on it (reconnect backoff, keepalive checks).

:class:`edge_agent.transport.mqtt.MqttLink` always runs on one: on a device it creates a
private loop for its single connection; a simulation hands one shared loop to all
its agents. Either way the agent's code path is the same.

Workflow::

    loop = NetworkLoop(name="fedge-net")
    loop.start()
    loop.watch(sock, on_ready)          # on_ready(readable, writable) runs on the loop
    loop.set_writable(sock, True)       # from any thread: also wait for writability
    handle = loop.call_later(2.0, fn)   # from any thread; handle.cancel()
    loop.call_soon(fn)                  # from any thread
    loop.add_ticker(fn)                 # fn() about once a second (keepalive)
    loop.unwatch(sock)                  # before the socket is closed
    loop.close()                        # stops and joins the thread (idempotent)

Every callback runs on the loop's thread and must not block: one slow callback
delays every connection on the loop. A callback that raises is logged and the loop
goes on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["NetworkLoop", "TimerHandle"]

logger = logging.getLogger(__name__)

TICK_S = 1.0
"""How often tickers run (paho's keepalive needs a call at least every few seconds)."""

ReadyCallback = Callable[[bool, bool], None]


class Watchable(Protocol):
    """Anything with a descriptor: a socket, an ``ssl.SSLSocket``, paho's SocketLike."""

    def fileno(self) -> int:
        """The OS descriptor."""
        ...


@dataclass(order=True)
class TimerHandle:
    """A scheduled call; :meth:`cancel` prevents it if it has not run yet."""

    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        """Do not run the call (no effect once it ran)."""
        self.cancelled = True


class NetworkLoop:
    """A thread that waits on many sockets at once and runs timers."""

    def __init__(self, *, name: str = "fedge-net") -> None:
        """Prepare the loop (no thread until :meth:`start`).

        Args:
            name: The thread's name (shows in stack dumps and ``py-spy``).
        """
        self._name = name
        self._lock = threading.RLock()
        # Opened by start(), so a loop that never runs holds no descriptors.
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._timers: list[TimerHandle] = []
        self._seq = itertools.count()
        self._tickers: dict[int, Callable[[], None]] = {}
        self._ticker_ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing or self._closed

    @property
    def running(self) -> bool:
        """Whether the loop's thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def in_loop(self) -> bool:
        """Whether the caller runs on the loop's thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the thread (idempotent).

        Raises:
            RuntimeError: the loop was closed.
        """
        with self._lock:
            if self._closed or self._closing:
                raise RuntimeError(f"network loop {self._name} is closed")
            if self._thread is not None:
                return
            wake, self._wake_w = socket.socketpair()
            wake.setblocking(False)
            self._wake_w.setblocking(False)
            selector = selectors.DefaultSelector()
            selector.register(wake, selectors.EVENT_READ, None)
            self._wake_r, self._selector = wake, selector
            self._thread = threading.Thread(
                target=self._run, args=(selector, wake), name=self._name, daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and release the selector (idempotent).

        Sockets still watched are left open: their owners close them.
        """
        with self._lock:
            if self._closed:
                return
            self._closing = True
            thread = self._thread
        self._wake()
        if thread is not None and not self.in_loop():
            thread.join(timeout)
        with self._lock:
            self._closed = True
            for resource in (self._selector, self._wake_r, self._wake_w):
                if resource is not None:
                    resource.close()

    # ------------------------------------------------------------ sockets

    def watch(self, sock: Watchable, on_ready: ReadyCallback) -> None:
        """Call ``on_ready(readable, writable)`` on the loop when ``sock`` is ready.

        Only readability is watched until :meth:`set_writable`.

        Raises:
            RuntimeError: the loop was not started.
        """
        with self._lock:
            if self._closed:
                return
            if self._selector is None:
                raise RuntimeError(f"network loop {self._name} is not started")
            with contextlib.suppress(KeyError):
                self._selector.unregister(sock)  # a stale entry from a reused descriptor
            self._selector.register(sock, selectors.EVENT_READ, on_ready)

    def unwatch(self, sock: Watchable) -> None:
        """Stop watching ``sock`` (idempotent; call it before closing the socket)."""
        with self._lock:
            if self._closed or self._selector is None:
                return
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)

    def set_writable(self, sock: Watchable, wanted: bool | Callable[[], bool]) -> None:
        """Also wait for ``sock`` to be writable (or stop waiting); any thread.

        ``wanted`` may be a predicate, evaluated under the same lock that every
        other change of interest takes: a writer that queues data and then asks for
        writability cannot be overtaken by a check that saw its queue still empty.
        """
        with self._lock:
            if self._closed or self._selector is None:
                return
            try:
                key = self._selector.get_key(sock)
            except (KeyError, ValueError):
                return  # not watched (any more): the connection is gone
            want = wanted() if callable(wanted) else wanted
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            if key.events != events:
                self._selector.modify(sock, events, key.data)

    # ------------------------------------------------------------ calls

    def call_soon(self, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` on the loop as soon as possible; any thread."""
        return self.call_later(0.0, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` on the loop after ``delay`` seconds; any thread."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), next(self._seq), callback)
        with self._lock:
            heapq.heappush(self._timers, handle)
        if not self.in_loop():
            self._wake()
        return handle

    def add_ticker(self, callback: Callable[[], None]) -> int:
        """Run ``callback`` on the loop about every :data:`TICK_S`; returns its id."""
        with self._lock:
            ticker_id = next(self._ticker_ids)
            self._tickers[ticker_id] = callback
        return ticker_id

    def remove_ticker(self, ticker_id: int) -> None:
        """Stop a ticker (idempotent)."""
        with self._lock:
            self._tickers.pop(ticker_id, None)

    # ------------------------------------------------------------ the thread

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):  # full (already woken) or closed
                wake.send(b"\0")

    def _run(self, selector: selectors.BaseSelector, wake: socket.socket) -> None:
        next_tick = time.monotonic() + TICK_S
        while not self._closing:
            timeout = min(self._next_timer_delay(), max(0.0, next_tick - time.monotonic()))
            try:
                events = selector.select(timeout)
            except (OSError, ValueError):
                if self.closed:
                    break
                logger.exception("network loop %s: select failed", self._name)
                time.sleep(0.05)
                continue
            for key, mask in events:
                if key.data is None:
                    with contextlib.suppress(OSError):
                        wake.recv(4096)
                    continue
                self._invoke(
                    key.data,
                    bool(mask & selectors.EVENT_READ),
                    bool(mask & selectors.EVENT_WRITE),
                )
            self._run_due_timers()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                with self._lock:
                    tickers = list(self._tickers.values())
                for ticker in tickers:
                    self._invoke(ticker)

    def _next_timer_delay(self) -> float:
        with self._lock:
            while self._timers and self._timers[0].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return TICK_S
            return max(0.0, self._timers[0].when - time.monotonic())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        due: list[TimerHandle] = []
        with self._lock:
            while self._timers and self._timers[0].when <= now:
                due.append(heapq.heappop(self._timers))
        for handle in due:
            if not handle.cancelled:
                handle.cancelled = True  # ran: a later cancel() changes nothing
                self._invoke(handle.callback)

    def _invoke(self, callback: Callable[..., None], *args: bool) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("network loop %s: a callback failed", self._name)
