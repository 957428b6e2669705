"""The device agent: stays connected, installs signed models, serves and reports.

One :class:`Agent` per device. Threads:

* paho's network thread receives messages and only puts them on the agent's
  bounded inbox (:meth:`Agent._enqueue`), so a slow install never stalls keepalives;
* one worker thread (:meth:`Agent._work`) does everything else, in order: decodes
  and routes messages, drives transfers and installs, closes telemetry windows and
  drains the telemetry spool. All agent state is touched by this thread only;
* callers' threads (``Agent.predict``, the local HTTP endpoint) only read the
  :class:`~edge_agent.serving.ModelServer`, which swaps models atomically.

Deployment, as the agent sees it (see :mod:`edge_agent.installer` for the rules)::

    cmd: deploy ──> check_deploy ──(reject)──> install_status rejected + reason
                        │ accept: staging area created, install_status accepted
    chunks (broadcast "fedge/v1/broadcast/<transfer_id>" or own "chunks" topic)
                        │ each written in place; progress every 10 %
                        │ nothing for stall_timeout_s (or after a restart or
                        │ reconnect): chunk_request for the missing ones, a
                        │ window at a time
    complete ──> verifying ──> installing (A/B + health check) ──> installed
                                   └──(load or health check fails)──> rolled_back

Restart: the committed ``state.json`` names the model to serve (checked against its
sha256 before loading); a staged transfer is reopened with only the chunks that
still verify and resumes once connected. Every message received is decoded
strictly; anything malformed, oversized, of unknown type or addressed elsewhere is
logged and dropped, and no handler exception stops the worker.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import numpy.typing as npt

from compress.errors import CompressError
from compress.manifest import Manifest
from compress.signing import SignedManifest, TrustedKeys
from compress.trust import DeviceProfile, verify_manifest
from edge_agent import __version__
from edge_agent.config import AgentConfig
from edge_agent.device_info import hardware_facts
from edge_agent.errors import AgentError, ProtocolError, StateError, TopicError
from edge_agent.http_api import HttpConfig, LocalHttpServer, parse_bind
from edge_agent.installer import AlreadyInstalled, Checkpoint, check_deploy, install
from edge_agent.model_store import InstalledModel, ModelStore
from edge_agent.mqtt import MqttLink, Will
from edge_agent.protocol import (
    DEFAULT_LIMITS,
    BroadcastTopic,
    Channel,
    Chunk,
    ChunkRequest,
    Deploy,
    DeviceTopic,
    Envelope,
    InstallState,
    InstallStatus,
    Limits,
    Message,
    ModelInfo,
    Rollback,
    Status,
    TelemetryBatch,
    agent_subscriptions,
    broadcast_topic,
    check_route,
    decode,
    device_topic,
    encode,
    parse_topic,
)
from edge_agent.runtime.base import ModelRuntime
from edge_agent.runtime.loader import available_runtimes, load_model
from edge_agent.serving import LoadedModel, ModelServer, Prediction
from edge_agent.spool import Spool
from edge_agent.staging import StagedTransfer, TransferInfo, list_transfers
from edge_agent.telemetry import TelemetryCollector

__all__ = ["Agent", "run_agent"]

logger = logging.getLogger(__name__)

INBOX_SIZE = 256
"""Messages waiting for the worker; beyond it they are dropped (and counted): the
network thread never blocks, and a lost chunk is simply asked for again."""

PUBLISH_ACK_TIMEOUT_S = 5.0
MAX_STALLS = 12
"""Requests for missing chunks in a row without any progress before a transfer fails."""
PROGRESS_STEPS = 10
RECENT_COMMANDS = 256
PENDING_REPORTS = 64

_WAKE = "wake"


def _no_checkpoint(_name: str) -> None:
    return None


@dataclass
class _Transfer:
    """The transfer being downloaded (worker thread only)."""

    staged: StagedTransfer
    manifest: Manifest
    deployment_id: str
    deadline: float
    pulling: bool = False
    stalls: int = 0
    outstanding: set[int] = field(default_factory=set)
    last_progress: int = -1


@dataclass
class AgentCounters:
    """Running counts, for health reports and tests."""

    messages: int = 0
    dropped: int = 0
    installs: int = 0
    rejections: int = 0


class Agent:
    """A fedge device agent (see the module docstring for the workflow)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], float] = time.time,
        checkpoint: Checkpoint = _no_checkpoint,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        """Prepare the agent; nothing connects until :meth:`start`.

        Raises:
            ConfigError: the trusted keys cannot be loaded.
            StateError: the data directory is unusable.
        """
        self.config = config
        self.device_id = config.device_id
        self._clock = clock
        self._checkpoint = checkpoint
        self._limits = limits
        self._trusted: TrustedKeys = config.trust.load()
        runtimes = frozenset({config.runtime}) if config.runtime else available_runtimes()
        self._device = DeviceProfile(runtimes=runtimes, hardware_tags=frozenset(config.tags))
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create data directory {config.data_dir}: {exc}") from exc
        self._store = ModelStore(config.data_dir)
        self._staging_root = config.data_dir / "staging"
        self._telemetry = TelemetryCollector(clock=clock)
        self._server = ModelServer(observer=self._telemetry)
        self._spool = Spool(config.data_dir / "spool", max_bytes=config.telemetry.spool_max_bytes)
        self._hardware = hardware_facts()
        self._inbox: queue.Queue[tuple[str, bytes] | str] = queue.Queue(maxsize=INBOX_SIZE)
        self._just_connected = threading.Event()
        self._transfer: _Transfer | None = None
        self._recent_commands: deque[str] = deque(maxlen=RECENT_COMMANDS)
        self._pending_reports: deque[InstallStatus] = deque(maxlen=PENDING_REPORTS)
        self._telemetry_seq = 0
        self.counters = AgentCounters()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._http: LocalHttpServer | None = None
        self._link = MqttLink(
            config.broker,
            client_id=self.device_id,
            subscriptions=agent_subscriptions(self.device_id, broadcast=False),
            on_message=self._enqueue,
            on_connect=self._on_link_up,
            will=lambda: Will(
                self._topic(Channel.STATUS), self._encode(self._status(online=False))
            ),
        )

    def _last_will(self) -> Will:
        """The offline status, made afresh before each connection attempt."""
        return Will(self._topic(Channel.STATUS), self._encode(self._status(online=False)))

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Restore the installed model and any staged transfer, then connect and serve.

        Raises:
            ConfigError: the HTTP endpoint address is invalid.
            BrokerError: TLS could not be set up.
        """
        self._restore_model()
        self._restore_transfer()
        if self.config.http:
            host, port = parse_bind(self.config.http)
            self._http = LocalHttpServer(
                self._server, HttpConfig(host=host, port=port), extra_health=self._health_extra
            )
            self._http.start()
            logger.info("local inference endpoint on http://%s:%d", *self._http.address)
        self._worker = threading.Thread(target=self._work, name=f"agent-{self.device_id}")
        self._worker.daemon = True
        self._worker.start()
        self._link.start()

    def stop(self) -> None:
        """Announce offline, disconnect, stop the endpoint and the worker (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake()
        if self._worker is not None:
            self._worker.join(timeout=30)
            if self._worker.is_alive():
                logger.error("the agent worker did not stop within 30 s")
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
        if self._transfer is not None and not (self._worker and self._worker.is_alive()):
            self._transfer.staged.close()

    def predict(self, inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike]) -> Prediction:
        """Run the installed model (see :meth:`ModelServer.predict`).

        Raises:
            NoModelError: no model is installed.
            ModelRuntimeError: bad inputs or an engine failure.
        """
        return self._server.predict(inputs)

    @property
    def model(self) -> LoadedModel | None:
        """The model being served."""
        return self._server.active

    @property
    def connected(self) -> bool:
        """Whether the agent is connected to the broker."""
        return self._link.connected

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where the local HTTP endpoint listens, when enabled and started."""
        return self._http.address if self._http is not None else None

    # ------------------------------------------------------------ restore on start

    def _restore_model(self) -> None:
        state = self._store.state
        for candidate in (state.current, state.previous):
            if candidate is None:
                continue
            try:
                self._activate(candidate)
            except (AgentError, CompressError) as exc:
                logger.error(
                    "cannot serve %s v%d from slot %s: %s",
                    candidate.name,
                    candidate.version,
                    candidate.slot,
                    exc,
                )
                continue
            if candidate is not state.current:
                logger.warning(
                    "serving the previous model %s v%d instead", candidate.name, candidate.version
                )
                self._store.commit(dc_replace(state, current=candidate, previous=None))
            return
        logger.info("no model installed yet")

    def _activate(self, model: InstalledModel) -> None:
        self._serve(model, load_model(model.format, self._store.read_payload(model)))

    def _serve(self, model: InstalledModel, runtime: ModelRuntime) -> None:
        self._server.activate(
            LoadedModel(
                name=model.name,
                version=model.version,
                sha256=model.sha256,
                format=model.format,
                slot=model.slot,
                runtime=runtime,
                installed_at=model.installed_at,
            )
        )

    def _restore_transfer(self) -> None:
        directories = list_transfers(self._staging_root)
        for directory in directories[:-1]:  # only the newest one may continue
            logger.info("discarding older staged transfer %s", directory.name[:12])
            shutil.rmtree(directory, ignore_errors=True)
        if not directories:
            return
        current = self._store.state.current
        done = TransferInfo.read(directories[-1])
        if current is not None and done is not None and current.sha256 == done.transfer_id:
            # Crashed after the commit, before cleaning up (the payload already moved
            # into its slot): report the success.
            self._report(done.deployment_id, InstallState.INSTALLED, current)
            shutil.rmtree(directories[-1], ignore_errors=True)
            return
        staged = StagedTransfer.open_or_discard(directories[-1])
        if staged is None:
            return
        info = staged.info
        try:
            manifest = verify_manifest(
                SignedManifest.from_bytes(staged.manifest_blob),
                self._trusted,
                now=self._now(),
                installed_version=None,
                device=self._device,
            )
            highest = self._store.state.highest_version(manifest.name)
            if highest is not None and manifest.version <= highest:
                raise StateError(f"{manifest.name} v{highest} was installed meanwhile")
        except (CompressError, AgentError) as exc:
            logger.info("dropping staged transfer %s: %s", info.transfer_id[:12], exc)
            self._report_error(info.deployment_id, InstallState.REJECTED, exc)
            staged.discard()
            return
        self._set_transfer(_Transfer(staged, manifest, info.deployment_id, deadline=0.0))
        staged_transfer = self._transfer
        assert staged_transfer is not None
        staged_transfer.pulling = True

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
            wake = next_telemetry
            if self._transfer is not None and self._link.connected:
                wake = min(wake, self._transfer.deadline)
            try:
                item = self._inbox.get(timeout=max(0.0, wake - now))
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
                now = time.monotonic()
                if now >= next_telemetry:
                    next_telemetry = now + interval
                    self._telemetry_tick()
                transfer = self._transfer
                if transfer is not None and now >= transfer.deadline and self._link.connected:
                    self._on_stall(transfer)
            except Exception:
                logger.exception("agent worker: unexpected error (continuing)")
        logger.debug("agent worker stopped")

    def _on_stall(self, transfer: _Transfer) -> None:
        """No chunk for a while: ask again, or give up when nothing comes any more."""
        transfer.stalls += 1
        expired = transfer.manifest.expires <= self._now()
        if transfer.stalls <= MAX_STALLS and not expired:
            self._request_missing(transfer)
            return
        reason = (
            "the manifest expired during the download"
            if expired
            else f"no chunks arrived for {transfer.stalls} requests in a row"
        )
        logger.warning("giving up transfer %s: %s", transfer.staged.info.transfer_id[:12], reason)
        self._set_transfer(None)  # cleaned up before anyone hears of it
        self._report(
            transfer.deployment_id, InstallState.FAILED, transfer.manifest,
            code="expired" if expired else "stalled", reason=reason,
        )  # fmt: skip

    def _set_transfer(self, transfer: _Transfer | None) -> None:
        """Replace the current transfer: discard the old one, follow the new one's chunks."""
        old = self._transfer
        if old is not None and old is not transfer:
            self._link.unsubscribe(broadcast_topic(old.staged.info.transfer_id))
            old.staged.discard()
        self._transfer = transfer
        if transfer is not None:
            # Before any answer goes out, so the broadcast cannot outrun the subscription.
            self._link.subscribe(broadcast_topic(transfer.staged.info.transfer_id))

    def _on_connected(self) -> None:
        self._publish(Channel.STATUS, self._status(online=True), retain=True)
        while self._pending_reports:
            if not self._publish(Channel.EVENTS, self._pending_reports[0]):
                break
            self._pending_reports.popleft()
        transfer = self._transfer
        if transfer is not None:
            self._report_transfer(transfer, force=True)
            if transfer.staged.complete:
                self._install(transfer)
            else:
                transfer.pulling = True
                self._request_missing(transfer)
        self._drain_spool()

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.counters.messages += 1
        try:
            where = parse_topic(topic)
            transfer = self._transfer
            if isinstance(where, BroadcastTopic) and (
                transfer is None or where.name != transfer.staged.info.transfer_id
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
        if isinstance(message, Chunk):
            self._on_chunk(message)
            return
        if envelope.id in self._recent_commands:
            logger.info("ignoring a repeated %s command %s", message.TYPE, envelope.id)
            return
        self._recent_commands.append(envelope.id)
        if isinstance(message, Deploy):
            self._on_deploy(message)
        elif isinstance(message, Rollback):
            self._on_rollback(message, envelope.id)
        else:
            self.counters.dropped += 1
            logger.warning("ignoring a %s message: not handled by this agent", message.TYPE)

    # ------------------------------------------------------------------- deploys

    def _on_deploy(self, deploy: Deploy) -> None:
        logger.info(
            "deploy %s: transfer %s, %d bytes",
            deploy.deployment_id,
            deploy.transfer_id[:12],
            deploy.total_size,
        )
        try:
            manifest = check_deploy(
                deploy,
                trusted=self._trusted,
                device=self._device,
                store=self._store,
                now=self._now(),
            )
        except AlreadyInstalled as done:
            self._report(deploy.deployment_id, InstallState.INSTALLED, done.model)
            return
        except (CompressError, AgentError) as exc:
            self.counters.rejections += 1
            logger.warning("rejected deploy %s: %s", deploy.deployment_id, exc)
            self._report_error(deploy.deployment_id, InstallState.REJECTED, exc)
            return
        current = self._transfer
        if current is not None and self._same_transfer(current, deploy):
            self._resume(current, deploy.deployment_id)
            return
        if current is not None:
            self._report(
                current.deployment_id,
                InstallState.FAILED,
                None,
                code="superseded",
                reason=f"superseded by {deploy.deployment_id}",
            )
            self._set_transfer(None)
        info = TransferInfo(
            deployment_id=deploy.deployment_id,
            transfer_id=deploy.transfer_id,
            total_size=deploy.total_size,
            chunk_size=deploy.chunk_size,
            chunk_count=deploy.chunk_count,
        )
        try:
            staged = StagedTransfer.create(self._staging_root, info, deploy.manifest)
        except StateError as exc:
            self._report_error(deploy.deployment_id, InstallState.FAILED, exc)
            return
        transfer = _Transfer(
            staged,
            manifest,
            deploy.deployment_id,
            deadline=time.monotonic() + self.config.transfer.stall_timeout_s,
        )
        self._set_transfer(transfer)
        self._report_transfer(transfer, force=True, state=InstallState.ACCEPTED)

    @staticmethod
    def _same_transfer(transfer: _Transfer, deploy: Deploy) -> bool:
        info = transfer.staged.info
        return (
            info.transfer_id == deploy.transfer_id
            and info.chunk_size == deploy.chunk_size
            and transfer.staged.manifest_blob == deploy.manifest
        )

    def _resume(self, transfer: _Transfer, deployment_id: str) -> None:
        """A deploy of the transfer in progress was (re)sent: carry on under its id."""
        if transfer.deployment_id != deployment_id:
            self._report(
                transfer.deployment_id, InstallState.FAILED, None, code="superseded",
                reason=f"continued as {deployment_id}",
            )  # fmt: skip
            try:
                transfer.staged.relabel(deployment_id)
            except StateError as exc:
                logger.warning("%s (carrying on)", exc)
            transfer.deployment_id = deployment_id
        self._report_transfer(transfer, force=True)
        transfer.pulling = True
        transfer.stalls = 0
        self._request_missing(transfer)

    def _on_chunk(self, chunk: Chunk) -> None:
        transfer = self._transfer
        if transfer is None or not transfer.staged.matches(chunk):
            logger.debug("chunk %d of an unknown transfer dropped", chunk.index)
            return
        staged = transfer.staged
        try:
            is_new = staged.write(chunk)
        except StateError as exc:
            logger.error("transfer %s: %s", staged.info.transfer_id[:12], exc)
            self._report_error(transfer.deployment_id, InstallState.FAILED, exc)
            self._set_transfer(None)
            return
        if not is_new:
            return
        self._checkpoint(f"chunk-{staged.held}")
        transfer.stalls = 0
        transfer.deadline = time.monotonic() + self.config.transfer.stall_timeout_s
        if staged.complete:
            self._install(transfer)
            return
        self._report_transfer(transfer)
        transfer.outstanding.discard(chunk.index)
        if transfer.pulling and len(transfer.outstanding) <= self.config.transfer.window // 2:
            self._request_missing(transfer)

    def _request_missing(self, transfer: _Transfer) -> None:
        transfer.deadline = time.monotonic() + self.config.transfer.stall_timeout_s
        transfer.pulling = True
        wanted = [
            index
            for index in transfer.staged.missing(self.config.transfer.window * 2)
            if index not in transfer.outstanding
        ][: self.config.transfer.window - len(transfer.outstanding)]
        if not wanted:
            # Everything asked for is overdue: ask again.
            transfer.outstanding.clear()
            wanted = transfer.staged.missing(self.config.transfer.window)
        if not wanted:
            return
        request = ChunkRequest(transfer_id=transfer.staged.info.transfer_id, indices=tuple(wanted))
        if self._publish(Channel.EVENTS, request):
            transfer.outstanding.update(wanted)
            logger.debug("requested chunks %s", wanted)

    def _install(self, transfer: _Transfer) -> None:
        self._report_transfer(transfer, force=True, state=InstallState.VERIFYING)
        self._report_transfer(transfer, force=True, state=InstallState.INSTALLING)
        try:
            outcome = self._install_staged(transfer)
        finally:
            self._set_transfer(None)  # whatever happened, the staging area goes first
        outcome()

    def _install_staged(self, transfer: _Transfer) -> Callable[[], None]:
        """Install; return the report to send once the staging area is gone."""
        manifest, deployment_id = transfer.manifest, transfer.deployment_id
        try:
            model, runtime = install(
                transfer.staged,
                manifest,
                store=self._store,
                installed_at=self._clock(),
                checkpoint=self._checkpoint,
            )
        except (CompressError, StateError) as exc:
            logger.error("install of %s v%d failed: %s", manifest.name, manifest.version, exc)
            failed = exc
            return lambda: self._report_error(deployment_id, InstallState.FAILED, failed, manifest)
        except AgentError as exc:
            logger.error(
                "%s v%d not installed, keeping the current model: %s",
                manifest.name,
                manifest.version,
                exc,
            )
            refused = exc
            return lambda: self._report_error(
                deployment_id, InstallState.ROLLED_BACK, refused, manifest
            )
        self._serve(model, runtime)
        self.counters.installs += 1

        def installed() -> None:
            self._report(deployment_id, InstallState.INSTALLED, model)
            self._publish(Channel.STATUS, self._status(online=True), retain=True)

        return installed

    # ----------------------------------------------------------------- rollback

    def _on_rollback(self, command: Rollback, command_id: str) -> None:
        deployment_id = f"rollback-{command_id}"
        state = self._store.state
        current, previous = state.current, state.previous
        transfer = self._transfer
        if transfer is not None and transfer.manifest.name == command.model:
            logger.info("rollback of %s cancels the transfer in progress", command.model)
            self._report(
                transfer.deployment_id,
                InstallState.FAILED,
                None,
                code="cancelled",
                reason="cancelled by a rollback",
            )
            self._set_transfer(None)
        if current is None or current.name != command.model:
            self._report(
                deployment_id,
                InstallState.FAILED,
                None,
                code="not_installed",
                reason=f"{command.model} is not the installed model",
            )
            return
        if previous is None:
            self._report(
                deployment_id,
                InstallState.FAILED,
                current,
                code="no_previous_model",
                reason="no previous model to go back to",
            )
            return
        try:
            self._activate(previous)
            self._store.commit(dc_replace(state, current=previous, previous=None))
        except (AgentError, CompressError) as exc:
            if self._server.active is not None and self._server.active.slot != current.slot:
                self._activate(current)
            self._report_error(deployment_id, InstallState.FAILED, exc)
            return
        logger.warning(
            "rolled back %s from v%d to v%d (%s)",
            command.model,
            current.version,
            previous.version,
            command.reason,
        )
        self._report(
            deployment_id, InstallState.ROLLED_BACK, previous, reason=command.reason or None
        )
        self._publish(Channel.STATUS, self._status(online=True), retain=True)

    # ---------------------------------------------------------------- telemetry

    def _telemetry_tick(self) -> None:
        active = self._server.active
        record = self._telemetry.close_window(
            model=active.name if active else None, version=active.version if active else None
        )
        dropped = self._spool.dropped
        batch = TelemetryBatch(seq=self._telemetry_seq, dropped=dropped, records=(record,))
        self._telemetry_seq += 1
        try:
            self._spool.append(self._encode(batch))
            self._spool.take_dropped(up_to=dropped)  # reported by this batch, not before
        except StateError as exc:
            logger.error("telemetry batch lost: %s", exc)
        self._drain_spool()

    def _drain_spool(self) -> None:
        topic = self._topic(Channel.TELEMETRY)
        while self._link.connected and len(self._spool):
            for item in self._spool.peek(16):
                if not self._link.publish_wait(topic, item.data, timeout=PUBLISH_ACK_TIMEOUT_S):
                    return
                self._spool.remove(item.seq)

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
        )

    def _report(
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

    def _report_error(
        self,
        deployment_id: str,
        state: InstallState,
        exc: CompressError | AgentError,
        model: Manifest | None = None,
    ) -> None:
        self._report(deployment_id, state, model, code=exc.code, reason=str(exc))

    def _report_transfer(
        self, transfer: _Transfer, *, force: bool = False, state: InstallState | None = None
    ) -> None:
        staged = transfer.staged
        total = staged.info.chunk_count
        step = staged.held * PROGRESS_STEPS // max(total, 1)
        if not force and step == transfer.last_progress:
            return
        transfer.last_progress = step
        self._report(
            transfer.deployment_id,
            state or InstallState.DOWNLOADING,
            transfer.manifest,
            held=staged.held,
            total=total,
        )

    def _health_extra(self) -> dict[str, Any]:
        totals = self._telemetry.totals
        return {
            "device_id": self.device_id,
            "connected": self._link.connected,
            "broker_error": self._link.last_error,
            "predictions": totals.predictions,
            "errors": totals.errors,
            "agent_version": __version__,
        }


def run_agent(config: AgentConfig, *, checkpoint: Checkpoint = _no_checkpoint) -> int:
    """Run an agent until SIGTERM or SIGINT (the ``fedge-agent run`` entry point).

    Returns:
        The process exit status: 0 after a clean stop, 1 when the agent cannot start.
    """
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received signal %d, stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            agent = Agent(config, checkpoint=checkpoint)
            agent.start()
        except (AgentError, CompressError) as exc:
            logger.error("cannot start the agent: %s", exc)
            return 1
        logger.info("agent %s running (data in %s)", config.device_id, Path(config.data_dir))
        stop.wait()
        agent.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
