"""Staged rollouts over MQTT: the adapter around the pure engine.

:class:`RolloutManager` keeps one :class:`~coordinator.rollout.engine.Rollout` per
running rollout. It feeds each engine with what the fleet says (install reports,
telemetry windows, presence, devices that join the target), calls
:meth:`~coordinator.rollout.engine.Rollout.tick` every ``tick_s`` seconds, sends the
``deploy`` and ``rollback`` commands the engine asks for through its own
:class:`~coordinator.delivery.deliveries.Deliveries` on the
:class:`~coordinator.link.port.Hub`, and saves the engine's snapshot and
per-device rows in a :class:`~coordinator.rollout.persistence.RolloutStore`: at once when the
rollout's state or stage changes or a command goes out, and within a tick when
only a device's progress (or its health baseline) changed, since a large fleet
reports those by the thousand on the network thread. A service killed at any
moment resumes its rollouts where they were; the progress of its last tick is
asked for again by the deploys it re-sends.

Workflow::

    manager = RolloutManager(hub, store)
    manager.load()                       # the rollouts a previous run left (before connecting)
    manager.start()                      # resumes them (re-sends what may be lost), ticks
    view = manager.create(row, artifact, policy, target, actor="ab12cd34ef56")
    hub.add_listener(manager.on_message)   # the service routes events here
    manager.pause(view.rollout_id, actor=...)
    manager.stop()

Commands go out on a sender thread: a ``deploy`` waits up to
``accept_wait_s`` for the devices to accept before pushing the payload, and the
event callbacks (on paho's thread) must never wait. Each ``SendDeploy`` action gets its
own deployment id, ``<rollout id>.<random>``, so a device's report names the rollout it
belongs to even after a restart, and a report of an earlier deployment to the same
device (a transfer that died with a killed process, reporting its failure after the
restart) is recognised as stale and ignored unless it says ``installed``. A
device's answer to a ``rollback`` names no rollout and goes to the rollouts in
which that device is being reverted.

A long-running service must not keep every delivery it ever made: the
manager's :class:`~coordinator.delivery.deliveries.Deliveries` serves a delivery's
chunks and resends its command to devices that come back for as long as it tracks
it. The engine does its own catch-up (a new deployment), so the manager forgets a
delivery once none
of its devices still needs it: a deploy when each device has been sent a newer
one or has left the in-progress states, a rollback when none of its devices is
still being reverted, and all of a rollout's deliveries when the rollout is
dropped (ended and settled, or a completed one superseded). The tick thread does
the forgetting, outside the manager's lock.

Health baselines. The engine judges a device's telemetry on the new version
against the device's recent windows of the version it served before. Agents send
telemetry every few seconds and a canary device installs at once, so the manager
feeds each device's newest stored windows of the version it served before (up
to five, each with enough calls, received within ``baseline_window_s``, an hour
by default; :meth:`~coordinator.rollout.persistence.RolloutStore.baselines`) to the engine when the
rollout is created and when a device joins it. The engine keeps a device's last
five such windows, stored or live, and judges against their summed calls and the
median of their p95s (:func:`~coordinator.rollout.health.combine_baseline`).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from compress.errors import CompressError
from coordinator.delivery.deliveries import ACCEPT_WAIT_S, Artifact, Deliveries, Delivery
from coordinator.delivery.tracker import DeviceState
from coordinator.errors import CoordinatorError, NotFoundError, RolloutError, StoreError
from coordinator.link.fleet import Target
from coordinator.link.port import Hub
from coordinator.rollout.actions import (
    Action,
    RolloutState,
    SendDeploy,
    SendRollback,
    StageReleased,
    StateChanged,
)
from coordinator.rollout.devices import Marker, RolloutArtifact
from coordinator.rollout.engine import Rollout
from coordinator.rollout.health import BASELINE_WINDOWS
from coordinator.rollout.persistence import RolloutStore
from coordinator.rollout.policy import RolloutPolicy
from coordinator.rollout.rows import RolloutDevice
from coordinator.rollout.running import (
    ENDED_STATES,
    RESTORED,
    Running,
    Sent,
    device_rows,
    settled,
    to_resume,
)
from edge_agent.protocol import Envelope, InstallStatus, Status, TelemetryBatch

__all__ = ["RolloutManager"]

logger = logging.getLogger(__name__)

TICK_S = 1.0
BASELINE_WINDOW_S = 3600.0
_STOP = object()


class RolloutManager:
    """Runs a service's staged rollouts (see the module docstring; thread-safe)."""

    def __init__(
        self,
        hub: Hub,
        store: RolloutStore,
        *,
        clock: Callable[[], float] = time.time,
        tick_s: float = TICK_S,
        baseline_window_s: float = BASELINE_WINDOW_S,
        accept_wait_s: float = ACCEPT_WAIT_S,
    ) -> None:
        """Prepare (no thread runs until :meth:`start`); the manager's deliveries
        listen to ``hub`` from now on.

        ``baseline_window_s``: how old a stored telemetry window may be to serve as
        a device's health baseline (module docstring). ``accept_wait_s``: how long a
        deploy waits for the devices' answers before pushing the payload.
        """
        self._hub = hub
        self._deliveries = Deliveries(hub, accept_wait_s=accept_wait_s)
        self._store = store
        self._clock = clock
        self._tick_s = tick_s
        self._baseline_window_s = baseline_window_s
        self._lock = threading.RLock()
        self._running: dict[str, Running] = {}
        self._retired: list[Delivery] = []  # deliveries of dropped rollouts, to forget
        self._outbox: queue.Queue[tuple[str, Action, str] | object] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loaded = False
        self._resumed: list[str] = []  # loaded, not resumed yet

    @property
    def deliveries(self) -> Deliveries:
        """The deliveries this manager sends through (:meth:`Deliveries.tracked`)."""
        return self._deliveries

    # ----------------------------------------------------------------- lifecycle

    def load(self) -> None:
        """Take back the rollouts a previous run left unfinished (idempotent).

        Call it before the hub connects: a persistent MQTT session
        delivers what devices sent while the service was down right after the
        connection, and those reports belong to these rollouts. Until a device is
        sent a deploy by this process, only an ``installed`` report of it counts
        (the module docstring's stale reports: a transfer that died with the
        previous process reports its failure).
        """
        if self._loaded:
            return
        self._loaded = True
        for row, engine in to_resume(self._store.rollouts()):
            try:
                artifact = Artifact.from_bytes(self._store.artifact_bytes(row.artifact_sha256))
                target = Target.parse(row.target)
            except (CoordinatorError, CompressError) as exc:
                logger.error("cannot resume rollout %s: %s", row.rollout_id, exc)
                continue
            running = Running(engine, artifact, target)
            running.sent.update((d.device_id, RESTORED) for d in engine.devices())
            with self._lock:
                self._running[row.rollout_id] = running
            self._resumed.append(row.rollout_id)

    def start(self) -> None:
        """Resume the loaded rollouts (:meth:`load`, done here if not yet), then tick."""
        self.load()
        now = self._clock()
        online = {r.device_id for r in self._hub.fleet() if r.online}
        for rollout_id in self._resumed:
            with self._lock:
                running = self._running.get(rollout_id)
                if running is None:
                    continue
                actions = running.engine.resume_after_restart(now, online)
                self._save(rollout_id, now)
            logger.info("resumed rollout %s (%s)", rollout_id, running.engine.state)
            self._dispatch(rollout_id, actions)
        self._resumed.clear()
        for target_fn, name in (
            (self._tick_loop, "rollout-tick"),
            (self._send_loop, "rollout-send"),
        ):
            thread = threading.Thread(target=target_fn, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop ticking and sending; the deliveries stop listening to the hub.

        State is saved (a new manager resumes it): what the tick thread had not
        saved yet (device progress, baselines) is saved here. Idempotent.
        """
        self._stopping.set()
        self._outbox.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=10.0)
        self._threads.clear()
        self._deliveries.close()
        with self._lock:
            now = self._clock()
            for rollout_id, running in list(self._running.items()):
                if running.unsaved:
                    self._save(rollout_id, now)
            for running in self._running.values():
                self._retired.extend(sent.delivery for sent in running.deliveries.values())
                running.deliveries.clear()
        self._forget_finished()

    # ---------------------------------------------------------------- operations

    def create(
        self,
        *,
        artifact_sha256: str,
        artifact: Artifact,
        policy: RolloutPolicy,
        target: Target,
        actor: str,
        seed: int | None = None,
    ) -> str:
        """Start a staged rollout of a stored artifact; returns its id.

        Raises:
            TargetError: the target matches no known device.
            RolloutError: the rollout cannot be built (e.g. an empty target).
        """
        now = self._clock()
        records = self._hub.fleet()
        chosen = target.select(records)
        if not chosen:
            raise RolloutError(f"no device matches {target.describe()}")
        rollout_id = f"ro-{uuid.uuid4().hex[:12]}"
        manifest = artifact.manifest
        engine = Rollout(
            rollout_id=rollout_id,
            artifact=RolloutArtifact(manifest.name, manifest.version, artifact_sha256),
            policy=policy,
            devices=[r.device_id for r in chosen],
            online=[r.device_id for r in chosen if r.online],
            seed=seed if seed is not None else uuid.uuid4().int % 2**32,
            now=now,
        )
        self._seed_baselines(engine, [r.device_id for r in chosen], now)
        with self._lock:
            for rid, running in list(self._running.items()):  # superseded
                if (running.engine.artifact.model == manifest.name
                        and running.engine.state is RolloutState.COMPLETED):  # fmt: skip
                    self._drop(rid)
            self._store.create_rollout(
                rollout_id,
                artifact_sha256=artifact_sha256,
                target=target.text,
                policy=policy.to_json(),
                state=str(engine.state),
                snapshot=engine.snapshot(),
                created_by=actor,
                at=now,
            )
            self._running[rollout_id] = Running(engine, artifact, target)
            actions = engine.start(now)
            self._save(rollout_id, now)
        logger.info("rollout %s of %s v%d started by %s", rollout_id, manifest.name,
                    manifest.version, actor)  # fmt: skip
        self._dispatch(rollout_id, actions)
        return rollout_id

    def pause(self, rollout_id: str, *, actor: str) -> None:
        """Stop releasing stages (see :meth:`Rollout.pause`)."""
        self._operate(rollout_id, lambda e, now: e.pause(now, actor))

    def resume(self, rollout_id: str, *, actor: str) -> None:
        """Go on after a pause (see :meth:`Rollout.resume`)."""
        self._operate(rollout_id, lambda e, now: e.resume(now, actor))

    def abort(self, rollout_id: str, *, actor: str, rollback: bool) -> None:
        """End the rollout (see :meth:`Rollout.abort`)."""
        self._operate(rollout_id, lambda e, now: e.abort(now, actor, rollback=rollback))

    def summary(self, rollout_id: str) -> dict[str, object] | None:
        """The engine's summary of a rollout this process runs (None otherwise)."""
        with self._lock:
            running = self._running.get(rollout_id)
            return running.engine.summary() if running is not None else None

    def devices(self, rollout_id: str) -> list[RolloutDevice] | None:
        """The devices of a rollout this process runs, as they stand now (None
        otherwise; the store may be up to a tick behind)."""
        with self._lock:
            running = self._running.get(rollout_id)
            return device_rows(running.engine) if running is not None else None

    def _operate(
        self, rollout_id: str, operation: Callable[[Rollout, float], list[Action]]
    ) -> None:
        now = self._clock()
        with self._lock:
            running = self._running.get(rollout_id)
            if running is None:
                if self._store.rollout(rollout_id) is None:
                    raise NotFoundError(f"no rollout {rollout_id}")
                raise RolloutError(f"rollout {rollout_id} has ended")
            actions = operation(running.engine, now)
            self._save(rollout_id, now)
        self._dispatch(rollout_id, actions)

    # -------------------------------------------------------------------- events

    def on_message(self, device_id: str, envelope: Envelope, _size: int) -> None:
        """Coordinator listener: route a device's message to the rollouts it concerns."""
        message = envelope.message
        if isinstance(message, InstallStatus):
            self._on_install_status(device_id, message)
        elif isinstance(message, TelemetryBatch):
            self._on_telemetry(device_id, message)
        elif isinstance(message, Status):
            self._on_status(device_id, message)

    def _on_install_status(self, device_id: str, status: InstallStatus) -> None:
        rollout_id = status.deployment_id.rpartition(".")[0]
        state = DeviceState(str(status.state))
        error = status.error_code or status.reason
        with self._lock:
            running = self._running.get(rollout_id)
            if running is not None:
                current = running.sent.get(device_id)
                if (
                    current not in (None, status.deployment_id)
                    and state is not DeviceState.INSTALLED
                ):
                    # An earlier deployment's late news (its transfer died with a previous
                    # process, say): the device has been sent a newer one since.
                    logger.debug("rollout %s: stale %s from %s (%s, now %s)", rollout_id, state,
                                 device_id, status.deployment_id, current)  # fmt: skip
                    return
                targets = [rollout_id]
            elif state is DeviceState.ROLLED_BACK or status.deployment_id.startswith("rollback"):
                targets = [
                    rid
                    for rid, running in self._running.items()
                    if (device := running.engine.device(device_id)) is not None
                    and device.marker is Marker.REVERTING
                ]
            else:
                return
        for rid in targets:
            self._event(rid, device_id, lambda e, now: e.on_install_status(
                device_id, state, now, error=error))  # fmt: skip

    def _on_telemetry(self, device_id: str, batch: TelemetryBatch) -> None:
        with self._lock:
            ids = [rid for rid, r in self._running.items() if r.engine.device(device_id)]
        for record in batch.records:
            if record.model is None or record.version is None:
                continue
            health = _at_event_time(
                functools.partial(
                    Rollout.on_health,
                    device_id=device_id,
                    model=record.model,
                    version=record.version,
                    predictions=record.predictions,
                    errors=record.errors,
                    p95_ms=record.latency_ms.p95,
                )
            )
            for rid in ids:
                self._event(rid, device_id, health)

    def _seed_baselines(self, engine: Rollout, device_ids: list[str], now: float) -> None:
        """Give the engine each device's stored baseline windows (module docstring)."""
        try:
            baselines = self._store.baselines(
                engine.artifact.model,
                other_than=engine.artifact.version,
                min_calls=engine.policy.health.min_predictions,
                since=now - self._baseline_window_s,
                windows=BASELINE_WINDOWS,
                device_ids=device_ids,
            )
        except StoreError as exc:
            logger.warning("rollout %s: no stored health baselines: %s", engine.rollout_id, exc)
            return
        for device_id, windows in baselines.items():
            for row in windows:
                if row.version is not None:
                    engine.on_health(device_id, model=engine.artifact.model,
                                     version=row.version, predictions=row.predictions,
                                     errors=row.errors, p95_ms=row.p95, now=now)  # fmt: skip

    def _on_status(self, device_id: str, status: Status) -> None:
        with self._lock:
            running = list(self._running.items())
        joining = [run for _rid, run in running if run.engine.device(device_id) is None]
        # The fleet's record (for tag targets) only when some rollout may take a newcomer.
        record = self._hub.device(device_id) if joining else None
        for rid, run in running:
            if run.engine.device(device_id) is not None:
                if status.online:
                    self._event(rid, device_id, lambda e, now: e.on_online(device_id, now))
                else:
                    self._event(rid, device_id, lambda e, now: e.on_offline(device_id, now))
            elif record is not None and run.target.matches(record):
                join: Callable[[Rollout, float], list[Action]] = functools.partial(
                    self._join, device_id=device_id, online=status.online
                )
                self._event(rid, device_id, join)

    def _join(self, engine: Rollout, now: float, *, device_id: str, online: bool) -> list[Action]:
        """Add a newcomer to a rollout, with its stored baseline."""
        actions = engine.add_device(device_id, now, online=online)
        if engine.device(device_id) is not None:  # halted and aborted rollouts take none
            self._seed_baselines(engine, [device_id], now)
        return actions

    def _event(
        self, rollout_id: str, device_id: str, apply: Callable[[Rollout, float], list[Action]]
    ) -> None:
        now = self._clock()
        with self._lock:
            running = self._running.get(rollout_id)
            if running is None:
                return
            engine = running.engine
            before = (engine.state, engine.stage, engine.device(device_id))
            actions = apply(engine, now)
            if actions or before[:2] != (engine.state, engine.stage):
                self._save(rollout_id, now)
            elif before[2] != engine.device(device_id):
                # One device's progress, or a new baseline window: the fleet sends
                # these by the thousand in a large rollout, so the tick thread saves
                # them (within tick_s; what a kill loses meanwhile, resume asks again).
                running.unsaved = True
        self._dispatch(rollout_id, actions)

    # --------------------------------------------------------------- the threads

    def _tick_loop(self) -> None:
        while not self._stopping.wait(self._tick_s):
            with self._lock:
                ids = list(self._running)
            for rollout_id in ids:
                try:
                    self._tick(rollout_id)
                except CoordinatorError:
                    logger.exception("rollout %s: tick failed", rollout_id)
            self._forget_finished()

    def _forget_finished(self) -> None:
        """Forget the deliveries no device needs any more."""
        with self._lock:
            done, self._retired = self._retired, []
            for running in self._running.values():
                done.extend(running.finished())
        for delivery in done:
            self._deliveries.forget(delivery)

    def _tick(self, rollout_id: str) -> None:
        now = self._clock()
        with self._lock:
            running = self._running.get(rollout_id)
            if running is None:
                return
            before = running.engine.snapshot()
            actions = running.engine.tick(now)
            after = running.engine.snapshot()
            if actions or after != before or running.unsaved:
                self._save(rollout_id, now, snapshot=after)
        self._dispatch(rollout_id, actions)

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is _STOP:
                return
            assert isinstance(item, tuple)
            rollout_id, action, deployment_id = item
            try:
                self._send(rollout_id, action, deployment_id)
            except CoordinatorError as exc:
                logger.warning(
                    "rollout %s: %s not sent: %s", rollout_id, type(action).__name__, exc
                )

    def _send(self, rollout_id: str, action: Action, deployment_id: str) -> None:
        with self._lock:
            running = self._running.get(rollout_id)
            if running is None:
                return
        ids = list(action.device_ids) if isinstance(action, (SendDeploy, SendRollback)) else []
        if isinstance(action, SendDeploy):
            delivery = self._deliveries.deploy(
                running.artifact, _devices(ids), deployment_id=deployment_id
            )
        elif isinstance(action, SendRollback):
            model = running.engine.artifact.model
            delivery = self._deliveries.rollback(_devices(ids), model, reason=action.reason)
        else:
            return
        with self._lock:
            current = self._running.get(rollout_id)
            if current is None:  # dropped while sending
                self._retired.append(delivery)
            else:
                current.deliveries[delivery.deployment_id] = Sent(
                    delivery, tuple(ids), rollback=isinstance(action, SendRollback)
                )

    # ------------------------------------------------------------------- helpers

    def _deployment_id(self, rollout_id: str, action: SendDeploy | SendRollback) -> str:
        """A new deployment id, unique across restarts; a deploy's devices now expect it.

        Set before the command is queued, so a stale report arriving meanwhile is
        already recognised as such.
        """
        deployment_id = f"{rollout_id}.{uuid.uuid4().hex[:8]}"
        if isinstance(action, SendDeploy):
            with self._lock:
                running = self._running.get(rollout_id)
                if running is not None:
                    for device_id in action.device_ids:
                        running.sent[device_id] = deployment_id
        return deployment_id

    def _dispatch(self, rollout_id: str, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, (SendDeploy, SendRollback)):
                if action.device_ids:
                    self._outbox.put((rollout_id, action, self._deployment_id(rollout_id, action)))
            elif isinstance(action, StateChanged):
                logger.info("rollout %s: %s -> %s (%s)", rollout_id, action.old, action.new,
                            action.reason)  # fmt: skip
            elif isinstance(action, StageReleased):
                logger.info("rollout %s: stage %d released to %d device(s)", rollout_id,
                            action.stage, len(action.device_ids))  # fmt: skip

    def _save(self, rollout_id: str, now: float, *, snapshot: dict[str, Any] | None = None) -> None:
        """Persist the engine (call with the lock held); forget a finished one.

        ``snapshot``: the engine's current snapshot, when the caller already took it.
        """
        running = self._running[rollout_id]
        running.unsaved = False
        engine = running.engine
        self._store.save_rollout(
            rollout_id,
            state=str(engine.state),
            snapshot=snapshot if snapshot is not None else engine.snapshot(),
            devices=device_rows(engine),
            at=now,
        )
        if engine.state in ENDED_STATES and settled(engine):
            self._drop(rollout_id)

    def _drop(self, rollout_id: str) -> None:
        """Stop running a rollout (call with the lock held); its deliveries go too."""
        running = self._running.pop(rollout_id)
        self._retired.extend(sent.delivery for sent in running.deliveries.values())


def _at_event_time(
    handler: Callable[..., list[Action]],
) -> Callable[[Rollout, float], list[Action]]:
    """An engine handler with every argument but ``now`` bound, as :meth:`_event` calls it."""
    return lambda engine, now: handler(engine, now=now)


def _devices(ids: list[str]) -> Target:
    return Target("device", tuple(ids), "device:" + ",".join(ids))
