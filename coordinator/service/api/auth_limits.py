"""Rate limits on failed authentication: a pure limiter, per client address.

Workflow (:class:`~coordinator.service.api.auth.Guard` drives it on every request
that needs a token):

1. Before anything else, :meth:`FailedAuthLimiter.retry_after` asks whether the
   client's address is cooling down. If so the request is answered 429 with
   ``Retry-After`` and its token is not even looked at, so a locked-out client
   cannot go on guessing (nor make the API hash and look up its guesses).
2. A request that fails authentication (401: no, malformed, unknown, revoked or
   expired token) is counted by :meth:`FailedAuthLimiter.failed`. The
   ``max_failures``-th failure within ``window_s`` seconds starts a cool-down of
   ``lockout_s`` seconds for that address; ``failed`` says so, and the caller logs
   and audits it. After the cool-down the address starts from zero.

A success does not clear earlier failures: a client holding one valid token
cannot use it to reset its count while it guesses others. A 403 (a valid token
whose role is too weak) is not a failed authentication and is not counted.

The key is the client's IP address as the server sees it: behind a reverse proxy
every client shares the proxy's address, so one client guessing locks out all of
them (make the proxy rate-limit, or give the API its own listener).

Restarts: the limiter lives in memory, but every failure it counted is also an
``auth.fail`` entry of the service's audit log. At start-up the service reads the
entries of the last ``window_s + lockout_s`` seconds back
(:meth:`~coordinator.service.fleet_service.FleetService.recent_auth_failures`)
and :meth:`FailedAuthLimiter.restore` replays them under the same rules, so a
client cooling down, or part-way to a cool-down, is still so after a restart (a
crash it provoked included).

Memory is bounded: at most ``max_clients`` addresses are tracked; past that,
addresses whose failures and cool-down are over are forgotten first, then those
still counting, then those cooling down (least recently seen first in each).

Nothing here does I/O; time comes from the ``clock`` callable (a fake in tests).
The limiter is thread-safe (the API checks tokens in a thread pool).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["AuthLimits", "Counted", "FailedAuthLimiter"]


@dataclass(frozen=True)
class AuthLimits:
    """How many failed authentications an address may make before it must wait.

    Attributes:
        max_failures: Failures within ``window_s`` that start a cool-down.
        window_s: Seconds over which failures are counted.
        lockout_s: Seconds of the cool-down (answered 429 without a token check).
        max_clients: Most addresses tracked at once (bounds memory).

    Raises:
        ValueError: a count below 1 or a time that is not a positive finite number.
    """

    max_failures: int = 10
    window_s: float = 60.0
    lockout_s: float = 60.0
    max_clients: int = 10_000

    def __post_init__(self) -> None:
        """Check the values."""
        for name in ("max_failures", "max_clients"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
        for name in ("window_s", "lockout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")


class Counted(NamedTuple):
    """What :meth:`FailedAuthLimiter.failed` counted.

    Attributes:
        failures: The address's failures within the window, this one included.
        locked_out: This failure started the address's cool-down.
    """

    failures: int
    locked_out: bool


@dataclass
class _Client:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float | None = None


class FailedAuthLimiter:
    """Counts failed authentications per address and imposes cool-downs.

    Args:
        limits: The thresholds.
        clock: Monotonic seconds (default :func:`time.monotonic`).
    """

    def __init__(self, limits: AuthLimits, clock: Callable[[], float] = time.monotonic) -> None:
        """Start with no address tracked."""
        self.limits = limits
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> float | None:
        """Seconds left of the address's cool-down, or None if it may try.

        Args:
            address: The client's IP address.
        """
        now = self._clock()
        with self._lock:
            client = self._clients.get(address)
            if client is None or client.locked_until is None:
                return None
            if now >= client.locked_until:
                del self._clients[address]  # the cool-down is over: start from zero
                return None
            return client.locked_until - now

    def failed(self, address: str) -> Counted:
        """Count a failed authentication of the address.

        Args:
            address: The client's IP address.

        Returns:
            Its failures within the window, and whether this one started a cool-down.
        """
        with self._lock:
            return self._count(address, self._clock())

    def restore(self, failures: Iterable[tuple[str, float]]) -> int:
        """Replay failures recorded before a restart, oldest first.

        Args:
            failures: ``(address, age)`` of each, ``age`` in seconds before now;
                those older than ``window_s + lockout_s`` change nothing.

        Returns:
            How many addresses are cooling down afterwards.
        """
        now = self._clock()
        with self._lock:
            for address, age in sorted(failures, key=lambda failure: -failure[1]):
                self._count(address, now - max(age, 0.0))
            return sum(
                1
                for client in self._clients.values()
                if client.locked_until is not None and now < client.locked_until
            )

    def _count(self, address: str, now: float) -> Counted:
        """:meth:`failed` at time ``now``, the lock held."""
        limits = self.limits
        client = self._clients.pop(address, None)
        if client is None or (client.locked_until is not None and now >= client.locked_until):
            client = _Client()  # new, or its cool-down is over: start from zero
        self._clients[address] = client  # most recently seen last
        failures = client.failures
        while failures and failures[0] <= now - limits.window_s:
            failures.popleft()
        failures.append(now)
        locked_out = len(failures) >= limits.max_failures and client.locked_until is None
        if locked_out:
            client.locked_until = now + limits.lockout_s
        self._forget(now)
        return Counted(len(failures), locked_out)

    def tracked(self) -> int:
        """How many addresses are tracked (for tests and metrics)."""
        with self._lock:
            return len(self._clients)

    def _forget(self, now: float) -> None:
        """Keep at most ``max_clients`` addresses: the finished ones go first."""
        limit = self.limits.max_clients
        if len(self._clients) <= limit:
            return
        window = self.limits.window_s
        for address in [
            address
            for address, client in self._clients.items()
            if (client.locked_until is None or now >= client.locked_until)
            and (not client.failures or client.failures[-1] <= now - window)
        ]:
            del self._clients[address]
        for address in [a for a, client in self._clients.items() if client.locked_until is None]:
            if len(self._clients) <= limit:
                return
            del self._clients[address]  # counting, least recently seen first
        while len(self._clients) > limit:
            self._clients.popitem(last=False)  # cooling down, least recently seen first
