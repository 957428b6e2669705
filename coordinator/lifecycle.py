"""``with obj:`` for the coordinator's long-lived objects, written once.

A hub holds a broker connection, the embedded broker a thread and an event loop, a
fleet of in-process agents their network threads, a delivery tracker its hub
listeners, the store its database. Each says how it lets go in one method; a mixin
here turns a ``with`` block into that call:

- :class:`Stoppable`: the object runs already; ``with`` gives it and calls
  :meth:`~Stoppable.stop` on the way out (:class:`~coordinator.sim.local_fleet.LocalFleet`);
- :class:`Startable`: the same, but ``with`` calls :meth:`~Startable.start` first
  (:class:`~coordinator.link.hub.MqttHub`,
  :class:`~coordinator.sim.embedded_broker.EmbeddedBroker`);
- :class:`Closeable`: the object is open already; ``with`` calls
  :meth:`~Closeable.close` on the way out
  (:class:`~coordinator.delivery.deliveries.Deliveries`,
  :class:`~coordinator.service.store.Store`).

The way out is the same whether the block ends normally or raises; the exception,
if any, propagates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

__all__ = ["Closeable", "Startable", "Stoppable"]


class _Held(ABC):
    """``with obj:`` gives the object and lets go of it at the end (:meth:`_let_go`)."""

    def __enter__(self) -> Self:
        """The object itself."""
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        """Let go."""
        self._let_go()

    @abstractmethod
    def _let_go(self) -> None:
        """The sub-class's way out."""


class Stoppable(_Held):
    """``with obj:`` gives the (running) object and calls ``obj.stop()`` at the end."""

    @abstractmethod
    def stop(self) -> None:
        """Let go of what the object holds (idempotent)."""

    def _let_go(self) -> None:
        self.stop()


class Startable(Stoppable):
    """``with obj:`` calls ``obj.start()``, gives the object and calls ``obj.stop()`` at the end."""

    @abstractmethod
    def start(self) -> None:
        """Acquire what the object needs to run."""

    def __enter__(self) -> Self:
        """Start; see :meth:`start`."""
        self.start()
        return self


class Closeable(_Held):
    """``with obj:`` gives the (open) object and calls ``obj.close()`` at the end."""

    @abstractmethod
    def close(self) -> None:
        """Let go of what the object holds (idempotent)."""

    def _let_go(self) -> None:
        self.close()
