"""The long-running coordinator service: ``fedge coordinator serve`` as a function.

:func:`run_service` runs the fleet's control plane in one process until SIGTERM or
SIGINT: the SQLite store, the MQTT connection (to the fleet's broker, or to an
embedded one), the :class:`~coordinator.service.fleet_service.FleetService` (telemetry ingest,
staged rollouts, federated runs) and the HTTP API under uvicorn, in the main
thread. Workflow:

1. Read what the configuration points at, so mistakes stop it before anything
   starts: the trusted keys (uploads are verified against them) and the broker's
   TLS files.
2. Take the API's address (a busy port fails here, in one line), open the store,
   start the embedded broker if asked, connect and start the service (interrupted
   runs marked, rollouts resumed).
3. Serve the API. Once uvicorn accepts requests, log one line with the URLs and
   call ``on_ready``.
4. On SIGTERM or SIGINT: uvicorn stops accepting and finishes the requests in
   flight (for :data:`GRACEFUL_SHUTDOWN_S` at most), then the service stops
   (telemetry flushed), the embedded broker stops and the store closes; the last
   log line says the service stopped cleanly and the function returns, so the
   process exits with status 0. Whatever fails to start is undone in reverse order.

Logs go to stdout (:func:`configure_logging`, called by the entry point), one line
per record with time, level and logger, as systemd's journal and container
runtimes expect.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import FrameType

import uvicorn

from coordinator.errors import CoordinatorError
from coordinator.link.hub import MqttHub
from coordinator.service.api.app import create_app
from coordinator.service.config import ServiceConfig
from coordinator.service.enrollment import EnrollmentDesk
from coordinator.service.fleet_service import FleetService
from coordinator.service.local import open_store
from coordinator.sim.embedded_broker import EmbeddedBroker
from edge_agent.config.agent import BrokerConfig
from edge_agent.protocol import COORDINATOR_SENDER

__all__ = [
    "CONNECT_TIMEOUT_S",
    "GRACEFUL_SHUTDOWN_S",
    "LOG_FORMAT",
    "configure_logging",
    "run_service",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""How long the service waits for the broker at start-up."""

GRACEFUL_SHUTDOWN_S = 5
"""How long requests in flight may take to finish after SIGTERM."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""One log line: time, level, logger, message."""

_BACKLOG = 128
_QUIET_LOGGERS = ("flwr", "amqtt", "transitions")


def configure_logging(level: str) -> None:
    """Send every log record to stdout, one line each (entry points only).

    Replaces any handlers configured before (the ``fedge`` root command logs to
    stderr). Chatty libraries are held at WARNING unless ``level`` is ``debug``.

    Args:
        level: One of :data:`~edge_agent.config.agent.LOG_LEVELS`.
    """
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format=LOG_FORMAT, stream=sys.stdout, force=True)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)


class _Shutdown:
    """The SIGTERM/SIGINT handler: remember the signal, tell uvicorn to stop.

    uvicorn installs its own handlers while it serves and, once it has stopped,
    raises the signals it caught again for the handlers it replaced (this one), so
    a signal is seen here whenever it arrives: while starting, serving or stopping.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.server: uvicorn.Server | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum
        if self.server is not None:
            self.server.should_exit = True

    @property
    def requested(self) -> bool:
        """Whether a signal asked the service to stop."""
        return self.signal is not None


@contextmanager
def _signals_handled(handler: _Shutdown) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``handler`` (main thread only), restoring them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Server(uvicorn.Server):
    """uvicorn's server, calling back once it accepts requests."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to the API's address, before anything else starts.

    Raises:
        CoordinatorError: the address cannot be bound (in use, not local, no
            permission), in one line.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise CoordinatorError(
            f"cannot listen on {shown}: {exc.strerror or exc} "
            "(is another coordinator running? choose another address with --bind HOST:PORT)"
        ) from exc
    sock.set_inheritable(True)
    return sock


def _broker(config: ServiceConfig, stack: ExitStack) -> BrokerConfig:
    """The broker settings to connect with, starting the embedded broker if asked.

    Raises:
        CoordinatorError: the embedded broker did not start (its port is taken).
    """
    if config.broker is not None:
        return config.broker
    embedded = EmbeddedBroker(port=config.embedded_broker_port)
    embedded.start()
    stack.callback(embedded.stop)
    logger.warning(
        "development mode (--dev): the embedded MQTT broker on %s accepts any client "
        "on this machine without a password and has no ACL; use your own broker "
        "(--broker) for a real fleet",
        embedded.url,
    )
    return BrokerConfig.from_url(embedded.url, username=COORDINATOR_SENDER)


def run_service(config: ServiceConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the coordinator service until SIGTERM or SIGINT (see the module docstring).

    Call it from the main thread: signals are handled there (elsewhere nothing
    stops it but the process ending).

    Args:
        config: The validated configuration.
        on_ready: Called with the API's base URL (``http://HOST:PORT``) once it
            accepts requests.

    Raises:
        ConfigError: a trusted key or a TLS file cannot be read (nothing started).
        CoordinatorError: the API's address or the embedded broker's port cannot be
            bound, or the database cannot be opened (a ``StoreError``).
        BrokerError: the broker cannot be reached within :data:`CONNECT_TIMEOUT_S`.
    """
    if not config.bind_is_loopback:
        logger.warning(
            "the API listens on %s, reachable from the network: it speaks plain HTTP, "
            "so put it behind a reverse proxy that terminates TLS",
            config.bind,
        )
    trusted = config.trust.load()
    statements = None if config.fleet is None else config.fleet.load()
    if config.broker is not None:
        config.broker.check_files()
    shutdown = _Shutdown()
    with ExitStack() as stack:
        stack.enter_context(_signals_handled(shutdown))
        listener = stack.enter_context(_listen(config.bind_host, config.bind_port))
        store = open_store(config.db, config.artifact_dir)
        stack.callback(store.close)
        broker = _broker(config, stack)
        hub = MqttHub(config.coordinator_config(broker))
        service = FleetService(store, hub, trusted, settings=config.settings(statements))
        service.start(CONNECT_TIMEOUT_S)
        stack.callback(service.stop)
        api_config = config.api_config()
        limits = api_config.auth_limits
        app = create_app(
            service,
            authenticate=service.authenticate,
            config=api_config,
            on_auth_failure=service.record_auth_failure,
            auth_history=service.recent_auth_failures(limits.window_s + limits.lockout_s),
            enrollment=EnrollmentDesk(
                store,
                config.enrollment,
                forget=hub.forget_device,
                ca=config.enrollment.device_ca(),
            ),
        )

        def ready() -> None:
            docs = "docs at /docs" if config.api.docs else "docs off"
            where = "embedded" if config.broker is None else f"as {broker.username}"
            logger.info(
                "fedge coordinator serving API on %s (%s), broker %s (%s), db %s",
                config.api_url,
                docs,
                broker.url,
                where,
                config.db,
            )
            if on_ready is not None:
                on_ready(config.api_url)

        server = _Server(
            uvicorn.Config(
                app,
                host=config.bind_host,
                port=config.bind_port,
                log_config=None,
                access_log=config.api.access_log,
                ws="none",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            ),
            on_started=ready,
        )
        shutdown.server = server
        if shutdown.requested:
            logger.info("stop requested while starting: not serving")
        else:
            server.run(sockets=[listener])
            if not server.started:
                raise CoordinatorError("the HTTP API did not start; the log above says why")
        if shutdown.signal is not None:
            logger.info("%s received: stopping", signal.Signals(shutdown.signal).name)
    logger.info("fedge coordinator stopped cleanly")
