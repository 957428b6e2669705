"""An MQTT broker inside the process: amqtt on loopback, for simulations.

``fedge simulate`` needs a broker and must run on a laptop where none is installed.
:class:`EmbeddedBroker` runs amqtt's pure-Python broker on its own asyncio loop in a
daemon thread, listening on ``127.0.0.1`` on a free port::

    with EmbeddedBroker() as broker:
        url = broker.url            # mqtt://127.0.0.1:<port>
        ...

``fedge coordinator serve --embedded-broker`` runs one on a fixed port instead
(``EmbeddedBroker(port=1883)``), so agents on the same machine can reach it.

It accepts any client (anonymous auth, no ACL: keep it on loopback, the default
``host``). A fleet that outgrows one process belongs on mosquitto, or an EMQX or
HiveMQ cluster; pass ``--broker`` to use one.

Retained messages follow MQTT 3.1.1 as mosquitto does (:func:`_broker_class`): a client
gets a retained message when it establishes a subscription that matches it, never on
connecting. amqtt 0.11 also sends every connecting client the retained messages of
every filter that *any* client subscribed to (so each agent got the retained status of
every other agent, through the coordinator's ``devices/+/status``), and while it does
so another client's subscription can end the connection ("dictionary changed size
during iteration"), which the client sees as a lost connection. On Python < 3.13 amqtt
also catches its own stand-in for ``asyncio.InvalidStateError``, so a PUBACK for a
message already settled escaped as an asyncio error: :func:`_asyncio_exceptions_for_amqtt`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import socket
import threading
import warnings
from concurrent.futures import Future
from contextvars import ContextVar
from typing import Any

from coordinator.errors import CoordinatorError
from coordinator.lifecycle import Startable

__all__ = ["EmbeddedBroker"]

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
ANONYMOUS_AUTH = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_free(host: str, port: int) -> None:
    """Fail clearly, before amqtt logs a traceback, when ``host:port`` is taken.

    Raises:
        CoordinatorError: the address cannot be bound (in use, or not local).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CoordinatorError(
                f"the embedded MQTT broker cannot listen on {host}:{port}: "
                f"{exc.strerror or exc} (another broker there? then use it with --broker)"
            ) from exc


_SUBSCRIBING: ContextVar[bool] = ContextVar("fedge_embedded_broker_subscribing", default=False)
"""True while amqtt handles a SUBSCRIBE packet, in that client's task."""


def _asyncio_exceptions_for_amqtt() -> None:
    """Let amqtt's protocol handler catch the exceptions asyncio raises.

    amqtt 0.11 imports ``InvalidStateError`` and ``QueueFull`` from asyncio together with
    ``QueueShutDown`` (Python 3.13); on older Pythons that import fails and it defines
    classes of its own, which asyncio never raises. Its handlers for a late PUBACK
    ("waiter already done") and a full delivery queue then never run.
    """
    from amqtt.mqtt.protocol import handler  # noqa: PLC0415 - coordinator extra

    for name in ("InvalidStateError", "QueueFull"):
        setattr(handler, name, getattr(asyncio, name))


@functools.cache
def _broker_class() -> Any:
    """amqtt's ``Broker``, sending retained messages only for a new subscription.

    amqtt calls ``_publish_retained_messages_for_subscription`` when it handles a
    SUBSCRIBE, and, on every connect, for each filter any client holds (see the module
    docstring). Only the first is MQTT 3.1.1 ([MQTT-3.3.1-6]): the class marks it and
    skips the second, which then returns without waiting, so amqtt's loop over the
    filters cannot be interrupted by another client's subscription either.
    """
    from amqtt.broker import Broker  # noqa: PLC0415 - coordinator extra

    _asyncio_exceptions_for_amqtt()

    class RetainOnSubscribeBroker(Broker):  # type: ignore[misc] # amqtt is untyped
        async def _handle_subscription(self, *args: Any) -> None:
            token = _SUBSCRIBING.set(True)
            try:
                await super()._handle_subscription(*args)
            finally:
                _SUBSCRIBING.reset(token)

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            if _SUBSCRIBING.get():
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return RetainOnSubscribeBroker


async def _shutdown(broker: Any) -> None:
    """Stop amqtt, then whatever its shutdown leaves behind.

    amqtt's own shutdown can stop half way (its session monitor cancels it), and
    leaves its listeners, client handlers and their connections: close and end them
    while the loop still runs, so no socket is left to the garbage collector.
    """
    try:
        await broker.shutdown()
    except (Exception, asyncio.CancelledError):  # cleaned up below
        logger.debug("amqtt's shutdown did not finish", exc_info=True)
    finally:
        for server in getattr(broker, "_servers", {}).values():
            listener = getattr(server, "instance", None)
            if listener is not None:
                listener.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        transports = getattr(asyncio.get_running_loop(), "_transports", {})
        for transport in list(transports.values()):
            transport.close()
        await asyncio.sleep(0.05)  # their connection_lost callbacks run


class EmbeddedBroker(Startable):
    """amqtt on ``127.0.0.1:<free port>`` in a background thread (see the module docstring)."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, max_connections: int = 5000
    ) -> None:
        """Prepare (nothing listens until :meth:`start`).

        Args:
            host: Address to listen on. Clients are not authenticated: keep it on
                loopback unless every machine that can reach it is trusted.
            port: TCP port; 0 picks a free one when :meth:`start` runs.
            max_connections: Most clients connected at once.
        """
        self.host = host
        self.port = port
        self._requested_port = port
        self._max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        """``mqtt://<host>:<port>`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def start(self) -> None:
        """Start listening.

        Raises:
            CoordinatorError: amqtt is not installed, or the broker did not start
                (the requested port is taken, say).
        """
        try:
            with warnings.catch_warnings():
                # amqtt's password-file plugin imports the stdlib 'crypt' (deprecated in 3.11).
                warnings.simplefilter("ignore", DeprecationWarning)
                importlib.import_module("amqtt.plugins.authentication")
                broker_class = _broker_class()
        except ImportError as exc:
            raise CoordinatorError(
                "the embedded broker needs amqtt: pip install 'fedge[coordinator]' "
                "(or pass --broker mqtt://host:port)"
            ) from exc
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)  # chatty at WARNING
        if self._requested_port:
            _check_free(self.host, self._requested_port)
        self.port = self._requested_port or _free_port(self.host)
        config = {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.host}:{self.port}",
                    "max_connections": self._max_connections,
                }
            },
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="embedded-broker", daemon=True
        )
        self._thread.start()

        async def start() -> Any:
            broker = broker_class(config, loop=loop)
            await broker.start()
            return broker

        future: Future[Any] = asyncio.run_coroutine_threadsafe(start(), loop)
        try:
            self._broker = future.result(START_TIMEOUT_S)
        except Exception as exc:
            self.stop()
            raise CoordinatorError(f"the embedded MQTT broker did not start: {exc}") from exc
        logger.info("embedded MQTT broker on %s", self.url)

    def stop(self) -> None:
        """Shut the broker down and end its thread (idempotent)."""
        loop, broker = self._loop, self._broker
        self._broker = None
        if loop is None:
            return
        if broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(_shutdown(broker), loop).result(START_TIMEOUT_S)
            except Exception:
                logger.warning("the embedded broker did not shut down cleanly", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=START_TIMEOUT_S)
        if not loop.is_running():
            loop.close()
        self._loop = None
        self._thread = None
