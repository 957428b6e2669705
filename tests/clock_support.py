"""A clock for tests: seconds that move only when the test moves them.

Code under test takes its time source as a callable (``clock=time.time`` by
default); tests pass a :class:`ManualClock` instead, set ``now`` or call
:meth:`ManualClock.advance`, and so control expiry, soak times, retention and
rate limits without sleeping.
"""

from __future__ import annotations


class ManualClock:
    """A settable clock (unix or monotonic seconds, as the code under test expects)."""

    def __init__(self, now: float = 1000.0) -> None:
        """Start at ``now``."""
        self.now = now

    def __call__(self) -> float:
        """The current time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds``."""
        self.now += seconds
