"""The device agent: stays connected, installs signed models, serves and reports.

One :class:`Agent` per device. Threads:

* the MQTT link's network thread receives messages and only puts them on the agent's
  bounded inbox (:meth:`Agent._enqueue`, never blocking: beyond the bound a message
  is dropped and counted, and a lost chunk is asked for again), so a slow install
  never stalls keepalives;
* one worker thread (:meth:`Agent._work`) does everything else, in order: decodes
  and routes messages, lets the :class:`~edge_agent.ota.updates.Updater` drive
  transfers, installs and rollbacks, closes telemetry windows and drains the
  telemetry spool (:mod:`edge_agent.agent.telemetry_uplink`). All agent state is
  touched by this thread only;
* one training thread (owned by the :class:`~edge_agent.training.participant.Participant`)
  runs local training and evaluation for rounds, so a long epoch never stalls
  deploys, chunk repairs or telemetry; it only computes, and wakes the worker, which
  sends the result (:meth:`Participant.poll`). Stopping the agent gives a running
  training a few seconds, then abandons it;
* callers' threads (``Agent.predict``, the local HTTP endpoint) only read the
  :class:`~edge_agent.serving.server.ModelServer`, which swaps models atomically.

A device provisioned with a key set (``trust.keyset``) also subscribes for good to
the retained key-set broadcast and applies rotations as they come
(:mod:`edge_agent.ota.keyset_store`); every trust decision asks that store for the
current keys.

With a fleet configured (``[trust] fleet``) the agent also subscribes, for as long as
it runs, to its fleet's retained statement; a
:class:`~edge_agent.ota.fleet_guard.FleetGuard` holds the fresh one, vouches for
deploys with it, and tells when the device is ``stale`` (no fresh statement): the
worker wakes when the held one expires and republishes the status.

On every (re)connect the agent publishes its retained status (hardware facts,
version, runtimes, tags, installed model, the PyTorch models it can train, the
key-set version, stale); its Last
Will, rebuilt before each connection attempt, marks it offline. Reports that cannot
go out while disconnected wait (bounded) and go first after reconnecting. Every
message received is decoded strictly; anything malformed, oversized, of unknown
type, repeated or addressed elsewhere is logged and dropped, and no handler
exception stops the worker.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy.typing as npt

from compress.manifest import Manifest
from compress.trust import DeviceProfile
from edge_agent import __version__
from edge_agent.agent.feedback_hook import open_feedback, record_feedback, remember
from edge_agent.agent.telemetry_uplink import PUBLISH_ACK_TIMEOUT_S, TelemetryUplink
from edge_agent.config.agent import AgentConfig
from edge_agent.device_info import hardware_facts
from edge_agent.errors import ProtocolError, StateError, TopicError
from edge_agent.monitoring import ServingMonitor
from edge_agent.monitoring.explain import Explanation
from edge_agent.ota.fleet_guard import FleetGuard
from edge_agent.ota.installer import Checkpoint, no_checkpoint
from edge_agent.ota.keyset_store import KeySetStore, load_trust
from edge_agent.ota.model_store import InstalledModel, ModelStore
from edge_agent.ota.updates import Updater
from edge_agent.protocol import (
    DEFAULT_LIMITS,
    BroadcastTopic,
    Channel,
    Chunk,
    ChunkRequest,
    Deploy,
    DeviceTopic,
    Envelope,
    FleetStatementMessage,
    InstallState,
    InstallStatus,
    KeySetChain,
    Limits,
    Message,
    ModelInfo,
    Rollback,
    Status,
    TrainTask,
    agent_subscriptions,
    broadcast_topic,
    check_route,
    decode,
    device_topic,
    encode,
    parse_topic,
)
from edge_agent.protocol.topics import KEYSET_BROADCAST
from edge_agent.runtime.loader import available_runtimes
from edge_agent.serving.http_access import http_config
from edge_agent.serving.http_api import LocalHttpServer
from edge_agent.serving.server import LoadedModel, ModelServer, Prediction
from edge_agent.serving.telemetry import TelemetryCollector
from edge_agent.spool import Spool
from edge_agent.training.data import LocalData
from edge_agent.training.participant import Participant
from edge_agent.training.residuals import ResidualStore
from edge_agent.transport.link import DeviceLink, Will
from edge_agent.transport.mqtt import MqttLink
from edge_agent.transport.network_loop import NetworkLoop

__all__ = ["Agent"]

logger = logging.getLogger(__name__)

INBOX_SIZE = 256
"""Messages waiting for the worker; beyond it they are dropped (and counted): the
network thread never blocks, and a lost chunk is simply asked for again."""

RECENT_COMMANDS = 256
PENDING_REPORTS = 64

_WAKE = "wake"


@dataclass
class AgentCounters:
    """Running counts, for health reports and tests."""

    messages: int = 0
    dropped: int = 0


class Agent:
    """A fedge device agent (see the module docstring for the workflow)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
        checkpoint: Checkpoint = no_checkpoint,
        limits: Limits = DEFAULT_LIMITS,
        network: NetworkLoop | None = None,
    ) -> None:
        """Prepare the agent; nothing connects until :meth:`start`.

        Args:
            config: The agent's settings.
            clock: Wall clock (tests pass a fixed one).
            checkpoint: Called at named points of an install (crash tests).
            limits: Protocol size limits.
            network: A network loop shared with other agents of this process
                (simulations); None: the agent's connection gets its own thread,
                as on a device. The agent's behaviour is the same either way.

        Raises:
            ConfigError: the trusted keys (or the provisioned key set) cannot be loaded.
            StateError: the data directory (or the stored key set) is unusable.
        """
        self.config = config
        self.device_id = config.device_id
        self._clock = clock
        self._limits = limits
        runtimes = frozenset({config.runtime}) if config.runtime else available_runtimes()
        self._device = DeviceProfile(runtimes=runtimes, hardware_tags=frozenset(config.tags))
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create data directory {config.data_dir}: {exc}") from exc
        trust = load_trust(config.trust, config.data_dir, now=self._now())
        self.keyset = trust if isinstance(trust, KeySetStore) else None
        trusted = trust.current if isinstance(trust, KeySetStore) else trust
        self._telemetry = TelemetryCollector(clock=clock)
        training = config.training
        self._feedback = open_feedback(training, config.data_dir)
        self._monitor = ServingMonitor()
        self._server = ModelServer(
            observer=self._telemetry,
            on_prediction=self._remember if self._feedback is not None else None,
            monitor=self._monitor,
            explanations=self._telemetry,
        )
        local_data = None
        if training.data is not None or self._feedback is not None:
            local_data = LocalData(
                training.data, feedback=self._feedback.buffer if self._feedback else None
            )
        self._train_examples = 0
        self._hardware = hardware_facts()
        self._inbox: queue.Queue[tuple[str, bytes] | str] = queue.Queue(maxsize=INBOX_SIZE)
        self._just_connected = threading.Event()
        self._recent_commands: deque[str] = deque(maxlen=RECENT_COMMANDS)
        self._pending_reports: deque[InstallStatus] = deque(maxlen=PENDING_REPORTS)
        self.counters = AgentCounters()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._http: LocalHttpServer | None = None
        self.fleet = FleetGuard(config.trust.fleet, config.data_dir, trusted=trusted, clock=clock)
        self._link: DeviceLink = MqttLink(
            config.broker,
            client_id=self.device_id,
            subscriptions=(
                *agent_subscriptions(self.device_id, broadcast=False),
                *((broadcast_topic(KEYSET_BROADCAST),) if self.keyset is not None else ()),
                *self.fleet.subscriptions(),
            ),
            on_message=self._enqueue,
            on_connect=self._on_link_up,
            will=self._last_will,
            network=network,
        )
        self._uplink = TelemetryUplink(
            Spool(config.data_dir / "spool", max_bytes=config.telemetry.spool_max_bytes),
            self._telemetry,
            self._monitor,
            self._link,
            topic=self._topic(Channel.TELEMETRY),
            encode=self._encode,
            stale=self.fleet.stale,
        )
        self.updates = Updater(
            store=ModelStore(config.data_dir),
            staging_root=config.data_dir / "staging",
            trusted=trusted,
            device=self._device,
            server=self._server,
            link=self._link,
            reporter=self,
            config=config.transfer,
            clock=clock,
            checkpoint=checkpoint,
            targeting=self.fleet.require_targeted if self.fleet.enabled else None,
        )
        self.rounds = Participant(
            device_id=self.device_id,
            data=local_data,
            link=self._link,
            send=lambda message: self._publish(Channel.EVENTS, message),
            residuals=ResidualStore(config.data_dir / "residuals"),
            limits=limits,
            stall_timeout_s=config.transfer.stall_timeout_s,
            holdout_fraction=training.holdout_fraction,
            models=training.models,
            torch_threads=training.torch_threads,
            wake=self._wake,
            clock=clock,
        )

    def _last_will(self) -> Will:
        """The offline status, made afresh before each connection attempt."""
        return Will(self._topic(Channel.STATUS), self._encode(self._status(online=False)))

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Restore the installed model and any staged transfer, then connect and serve.

        The installed models are re-verified against their signed manifests first
        (:mod:`edge_agent.ota.reverify`); what fails is not served, and is reported
        once connected and in ``/v1/health`` (``model_problems``, ``model_expired``).

        Raises:
            ConfigError: the HTTP endpoint address is invalid.
            BrokerError: TLS could not be set up.
        """
        self.updates.restore()
        self._train_examples = self.rounds.train_examples()
        http = http_config(self.config)
        if http is not None:
            self._http = LocalHttpServer(
                self._server,
                http,
                extra_health=self._health_extra,
                feedback=self.feedback if self._feedback is not None else None,
            )
            self._http.start()  # logs where it listens (TCP, Unix socket)
        self._worker = threading.Thread(target=self._work, name=f"agent-{self.device_id}")
        self._worker.daemon = True
        self._worker.start()
        self._link.start()

    def stop(self) -> None:
        """Announce offline, disconnect, stop the endpoint and the worker, close the
        stores (idempotent; a stopped agent does not start again)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake()
        if self._worker is not None:
            self._worker.join(timeout=30)
            if self._worker.is_alive():
                logger.error("the agent worker did not stop within 30 s")
        self.rounds.close()
        if self._link.connected:
            self._link.publish_wait(
                self._topic(Channel.STATUS),
                self._encode(self._status(online=False)),
                retain=True,
                timeout=PUBLISH_ACK_TIMEOUT_S,
            )
        self._link.stop()
        if self._http is not None:
            self._http.stop()
        if not (self._worker and self._worker.is_alive()):
            self.updates.close()
            self._uplink.close()
            if self._feedback is not None:
                self._feedback.buffer.close()

    def predict(self, inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike]) -> Prediction:
        """Run the installed model (see :meth:`ModelServer.predict`).

        Raises:
            NoModelError: no model is installed.
            InvalidInputError: inputs that do not fit the model's manifest (shape,
                dtype, NaN/inf, out of the reference range): refused, with a reason.
            ModelRuntimeError: an engine failure.
        """
        return self._server.predict(inputs)

    def explain(
        self, inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike], target: int | None = None
    ) -> Explanation:
        """Per-feature occlusion attributions of the installed model for one input
        (see :meth:`ModelServer.explain` and :mod:`edge_agent.monitoring.explain`).

        Raises:
            NoModelError: no model is installed.
            InvalidInputError: the input does not fit the model's manifest.
            ExplainError: not one example, several model inputs, a bad target.
            ModelRuntimeError: an engine failure.
        """
        return self._server.explain(inputs, target)

    def feedback(
        self,
        prediction_id: str,
        label: int | Sequence[int] | None = None,
        *,
        target: float | Sequence[float] | Sequence[Sequence[float]] | None = None,
    ) -> int:
        """Record the true label(s), or a regression model's true target(s), of an
        earlier prediction as training examples.

        Returns:
            The number of examples stored.

        Raises:
            TrainingError: feedback is off, the prediction is unknown (or too old, or
                already labelled), or a label or target is invalid (see
                :meth:`~edge_agent.training.feedback.FeedbackCollector.record_feedback`).
            StateError: the examples cannot be written.
        """
        return record_feedback(
            self._feedback, self._server.active, prediction_id, label, target=target
        )

    def _remember(self, prediction: Prediction, inputs: Any) -> None:
        assert self._feedback is not None
        remember(self._feedback, prediction, inputs)

    @property
    def model(self) -> LoadedModel | None:
        """The model being served."""
        return self._server.active

    def drop_connection(self) -> None:
        """Cut the MQTT connection as a network failure would (the broker sends the
        Last Will); the agent reconnects by itself. Simulations use it."""
        self._link.drop_connection()

    @property
    def connected(self) -> bool:
        """Whether the agent is connected to the broker."""
        return self._link.connected

    @property
    def telemetry_published(self) -> int:
        """Telemetry batches the broker has acknowledged since start (one window each)."""
        return self._uplink.published

    # ------------------------------------------------------------ network thread

    def _enqueue(self, topic: str, payload: bytes, _retained: bool = False) -> None:
        try:
            self._inbox.put_nowait((topic, payload))
        except queue.Full:
            self.counters.dropped += 1
            logger.warning("inbox full: dropped a message on %s", topic[:120])

    def _on_link_up(self) -> None:
        self._just_connected.set()
        self._wake()

    def _wake(self) -> None:
        # If the inbox is full the worker is busy and sees the flags on its next turn.
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(_WAKE)

    # -------------------------------------------------------------- worker thread

    def _work(self) -> None:
        interval = self.config.telemetry.interval_s
        next_telemetry = time.monotonic() + interval
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                item = self._inbox.get(timeout=max(0.0, self._next_wake(now, next_telemetry) - now))
            except queue.Empty:
                item = None
            if self._stopping.is_set():
                break
            try:
                if self._just_connected.is_set():
                    self._just_connected.clear()
                    self._on_connected()
                if isinstance(item, tuple):
                    self._on_message(*item)
                if self.fleet.stale_changed():
                    self.announce()
                self.rounds.poll()
                now = time.monotonic()
                if now >= next_telemetry:
                    next_telemetry = now + interval
                    self._telemetry_tick()
                deadline = self.updates.deadline
                if deadline is not None and now >= deadline and self._link.connected:
                    self.updates.on_deadline()
                deadline = self.rounds.deadline
                if deadline is not None and now >= deadline and self._link.connected:
                    self.rounds.on_deadline()
            except Exception:
                logger.exception("agent worker: unexpected error (continuing)")
        logger.debug("agent worker stopped")

    def _next_wake(self, now: float, next_telemetry: float) -> float:
        """When (monotonic) the worker must run next: telemetry, a deadline of the
        updater or the rounds (while connected), or the fleet statement's expiry."""
        wake = next_telemetry
        for deadline in (self.updates.deadline, self.rounds.deadline):
            if deadline is not None and self._link.connected:
                wake = min(wake, deadline)
        expiry = self.fleet.seconds_to_expiry()
        if expiry is not None:
            wake = min(wake, now + expiry + 0.05)
        return wake

    def _on_connected(self) -> None:
        self.announce()
        while self._pending_reports:
            if not self._publish(Channel.EVENTS, self._pending_reports[0]):
                break
            self._pending_reports.popleft()
        self.updates.on_connected()
        self.rounds.on_connected()
        self._uplink.drain()

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.counters.messages += 1
        try:
            where = parse_topic(topic)
            if isinstance(where, BroadcastTopic) and not (
                self.updates.wants_broadcast(where.name)
                or self.rounds.wants_broadcast(where.name)
                or (where.name == KEYSET_BROADCAST and self.keyset is not None)
                or self.fleet.wants_broadcast(where.name)
            ):
                return  # someone else's transfer (or another broadcast): not ours to decode
            if isinstance(where, DeviceTopic) and where.device_id != self.device_id:
                raise TopicError(
                    f"message for device {where.device_id!r} reached {self.device_id!r}"
                )
            envelope = decode(payload, self._limits)
            check_route(envelope, topic)
        except ProtocolError as exc:
            self.counters.dropped += 1
            logger.warning("dropped a message on %s: %s: %s", topic[:120], exc.code, exc)
            return
        self._dispatch(envelope)

    def _dispatch(self, envelope: Envelope) -> None:
        message: Message = envelope.message
        if isinstance(message, KeySetChain):  # retained: the same one again after reconnects
            if self.keyset is not None and self.keyset.receive(message.keysets, now=self._now()):
                self.announce()  # the status reports the new key-set version
            return
        if isinstance(message, Chunk):
            if not self.rounds.on_chunk(message):
                self.updates.on_chunk(message)
            return
        if isinstance(message, FleetStatementMessage):
            self.fleet.on_statement(message)  # retained: re-delivered on reconnects
            return
        if envelope.id in self._recent_commands:
            logger.info("ignoring a repeated %s command %s", message.TYPE, envelope.id)
            return
        self._recent_commands.append(envelope.id)
        if isinstance(message, Deploy):
            self.updates.on_deploy(message)
        elif isinstance(message, Rollback):
            self.updates.on_rollback(message, envelope.id)
        elif isinstance(message, TrainTask):
            self.rounds.on_task(message)
            self._announce_if_data_changed()
        else:
            self.counters.dropped += 1
            logger.warning("ignoring a %s message: not handled by this agent", message.TYPE)

    # ---------------------------------------------------------------- telemetry

    def _announce_if_data_changed(self) -> None:
        examples = self.rounds.train_examples()
        if examples != self._train_examples:
            self._train_examples = examples
            self.announce()

    def _telemetry_tick(self) -> None:
        self._announce_if_data_changed()
        self._uplink.close_window(self._server.active)

    # ------------------------------------------------------------------ helpers

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _topic(self, channel: Channel) -> str:
        return device_topic(self.device_id, channel)

    def _encode(self, message: Message) -> bytes:
        return encode(message, sender=self.device_id, sent_at=self._clock(), limits=self._limits)

    def _publish(self, channel: Channel, message: Message, *, retain: bool = False) -> bool:
        return self._link.publish(self._topic(channel), self._encode(message), retain=retain)

    def _status(self, *, online: bool) -> Status:
        active = self._server.active
        models = (ModelInfo(active.name, active.version, active.sha256),) if active else ()
        return Status(
            online=online,
            agent_version=__version__,
            hardware=self._hardware,
            runtimes=tuple(sorted(self._device.runtimes)),
            tags=self.config.tags,
            models=models,
            train_examples=self._train_examples,
            train_models=self.rounds.train_models,
            keyset_version=self.keyset.version if self.keyset is not None else None,
            stale=self.fleet.stale(),
        )

    # ------------------------------------------------- Reporter (for the updater)

    def report(
        self,
        deployment_id: str,
        state: InstallState,
        model: InstalledModel | Manifest | None,
        *,
        code: str | None = None,
        reason: str | None = None,
        held: int = 0,
        total: int = 0,
    ) -> None:
        """Send an ``install_status``; outcomes that cannot go out now wait (bounded)."""
        status = InstallStatus(
            deployment_id=deployment_id,
            state=state,
            model=model.name if model is not None else None,
            version=model.version if model is not None else None,
            chunks_held=held,
            chunks_total=total,
            error_code=code,
            reason=reason[: self._limits.max_string_chars] if reason else None,
        )
        if not self._publish(Channel.EVENTS, status) and state is not InstallState.DOWNLOADING:
            self._pending_reports.append(status)

    def request_chunks(self, request: ChunkRequest) -> bool:
        """Ask the coordinator for chunks; True if the request went out."""
        return self._publish(Channel.EVENTS, request)

    def announce(self) -> None:
        """Publish the retained online status again (the installed model changed)."""
        self._publish(Channel.STATUS, self._status(online=True), retain=True)

    def _health_extra(self) -> dict[str, Any]:
        totals = self._telemetry.totals
        return {
            "device_id": self.device_id,
            "connected": self._link.connected,
            "broker_error": self._link.last_error,
            "predictions": totals.predictions,
            "errors": totals.errors,
            "explanations": totals.explanations,
            "agent_version": __version__,
            "model_expired": self.updates.serving_expired(),
            "model_problems": [problem.to_json() for problem in self.updates.problems],
            "stale": self.fleet.stale(),
            "fleet": self.fleet.to_json(),
        }
