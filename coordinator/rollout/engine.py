"""Staged rollouts of a signed model to a fleet: a pure engine that returns actions.

The engine holds the whole state of one rollout and decides; the adapter around it
(the coordinator service) does the I/O: it feeds the engine with events and the
current time, executes the :data:`~coordinator.rollout.actions.Action` values the
engine returns (MQTT ``deploy`` and ``rollback`` commands, audit-log lines) and saves
:meth:`Rollout.snapshot` after every call that changed something, so a killed
service restarts with :meth:`Rollout.restore` and finishes the rollout. There is
no clock, thread or randomness in here: every method that needs the time takes
``now`` (unix seconds), and the stage order comes from a seed kept in the state.

The engine's parts: the actions and states it returns
(:mod:`coordinator.rollout.actions`), each device's record
(:mod:`coordinator.rollout.devices`), health samples and baselines
(:mod:`coordinator.rollout.health`), the rollout's state with its snapshot format
(:mod:`coordinator.rollout.record`), and here the rules.

Workflow:

1. The service resolves the target and builds a :class:`Rollout` with the devices,
   those online, the artifact, a :class:`~coordinator.rollout.policy.RolloutPolicy`
   and a seed. The devices are shuffled with the seed (deterministically) and cut
   into stages: the canary first, then the waves
   (:meth:`~coordinator.rollout.policy.RolloutPolicy.stage_sizes`). Devices
   online at creation come first, so the canary is made of devices that can
   answer whenever the target has enough of them.
2. :meth:`Rollout.start` releases the canary: ``SendDeploy`` to its online devices.
3. The adapter forwards install reports (:meth:`Rollout.on_install_status`),
   telemetry windows (:meth:`Rollout.on_health`), presence changes
   (:meth:`Rollout.on_online`, :meth:`Rollout.on_offline`) and devices that join
   the target (:meth:`Rollout.add_device`), and calls :meth:`Rollout.tick`
   every few seconds.
4. :meth:`Rollout.tick` times out silent devices and judges the current stage:
   once its soak time has passed, enough devices reported and its failure rate is
   at most ``max_failure``, the next stage is released, or the rollout
   *completes* after the last one. Operators :meth:`~Rollout.pause`,
   :meth:`~Rollout.resume` and :meth:`~Rollout.abort`.
5. After a restart, :meth:`Rollout.resume_after_restart` re-sends what may have
   been lost.

Rollout states (:class:`RolloutState`): ``created`` → ``running`` (by ``start``)
⇄ ``paused``; then one of the final states ``completed``, ``halted`` (the failure
threshold was exceeded) or ``aborted`` (by the operator). A halted rollout never
releases another stage and cannot resume (fix the cause and start a new rollout;
devices that already run the version answer the new deploy "installed" at once);
it can still be aborted, to roll back the earlier stages too. ``abort`` is
accepted in every state but ``completed``, and repeating it is a no-op (except
that ``rollback=True`` then still rolls back what was not). ``pause`` of a paused
and ``resume`` of a running rollout are no-ops.

Judging a stage. A device of the released stage has *reported* when it is
``installed`` (and, with ``health.require_health``, a healthy telemetry window
arrived) — a success — or ``failed``, ``rejected``, ``rolled_back``,
``timed_out`` or ``unhealthy`` — a failure. Offline devices that have not
reported count for neither. The stage's failure rate is failures over reports,
of the current stage only (earlier stages were judged already).

* A stage fails only from ``min(min_failed_devices, stage size)`` failed devices
  (default 2: one device alone cannot halt a stage of two or more, a canary of
  one halts when it fails; :mod:`coordinator.rollout.policy`).
* At any moment while running or paused: when the failures already exceed
  ``max_failure`` times the whole stage's size (and reach that floor), no later
  report can save the stage and the rollout halts at once.
* In :meth:`~Rollout.tick` while running: when ``soak_s`` has passed since the
  stage was released (or since a device joined it, see below) and at least
  ``min(min_reports, stage size)`` devices reported, the stage passes if its
  failure rate is at most ``max_failure`` or its failures are below the floor;
  if not, the engine waits while online devices of the stage may still report (in
  progress, or installed and waiting for health), and halts once none may.
* A stage never passes on fewer reports: one whose devices are all offline waits
  for them (they are deployed as they come back, see catch-up below). Online
  devices go first in the stage order, so only the last stages can be made of
  offline devices alone.

On a halt with ``rollback_on_halt``, the devices of the halted stage that
installed the new version (healthy or not) get ``SendRollback`` and are marked
``reverting``; they become ``reverted`` when they report ``rolled_back`` (or
``revert_failed`` when they report ``failed``/``rejected``: the device had nothing
to go back to, or could not). Devices of that stage still installing are not sent
a rollback (it would undo their *previous* model): they get one when they report
``installed``. Earlier stages keep the new version unless the operator aborts with
``rollback=True``. Installed devices that are offline are rolled back when they
come online. A ``SendRollback`` is re-sent when a ``reverting`` device reconnects and
by :meth:`~Rollout.resume_after_restart`; an agent that already went back answers
the second one ``failed`` ("no previous model"), which shows as
``revert_failed``.

Device reports follow the rules of :mod:`coordinator.rollout.devices`.

Presence and catch-up. Devices offline when their stage is released are
``offline``; when they come online (and the rollout is running, paused or
completed) they get ``SendDeploy`` — so do released devices that were ``offline`` or
``timed_out`` and reconnect. Pausing stops new stages, not these catch-ups. An
online device with no outcome ``install_timeout_s`` after its last ``SendDeploy``
becomes ``timed_out``.

Late devices (:meth:`~Rollout.add_device`): while the canary is the current stage
(or before the start) a newcomer joins the first wave, so the canary stays what
was planned; afterwards it joins the current stage and is deployed at once if
online, and the stage's soak restarts from then (catch-ups of offline devices do
not restart it). A single-stage rollout puts newcomers in the canary. Halted and
aborted rollouts take no newcomers; a completed one deploys to them.

Health: see :mod:`coordinator.rollout.health`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable
from dataclasses import replace

from coordinator.delivery.tracker import IN_PROGRESS_STATES, DeviceState, admits
from coordinator.errors import RolloutError
from coordinator.rollout.actions import (
    DEPLOYING_STATES,
    JUDGING_STATES,
    Action,
    RolloutState,
    SendDeploy,
    SendRollback,
    StageReleased,
)
from coordinator.rollout.devices import REPORTABLE, DeviceInRollout, Marker, sorted_ids
from coordinator.rollout.health import HealthSample, health_problem
from coordinator.rollout.record import RolloutRecord, Stage
from edge_agent.protocol import is_valid_device_id

__all__ = ["Rollout"]

logger = logging.getLogger(__name__)


class Rollout(RolloutRecord):
    """One staged rollout and its rules (see the module docstring; not thread-safe).

    Built as a :class:`~coordinator.rollout.record.RolloutRecord` (the target's
    devices, those online, the artifact, the policy, a seed and the time);
    restored from a snapshot with :meth:`~coordinator.rollout.record.RolloutRecord.restore`.
    """

    # ----------------------------------------------------------------- rules

    def _release(self, stage: int, now: float) -> list[Action]:
        self._stages[stage] = Stage(released_at=now, soak_from=now)
        members = [d for d in self._devices.values() if d.stage == stage]
        online = []
        for device in members:
            if device.online:
                online.append(device.device_id)
            self._put(device.released(now), now)
        logger.info("rollout %s: stage %d released", self.rollout_id, stage)
        actions: list[Action] = [StageReleased(stage, sorted_ids(d.device_id for d in members))]
        if online:
            actions.append(SendDeploy(sorted_ids(online)))
        return actions

    def _halt(self, now: float, reason: str) -> list[Action]:
        self._halt_reason = reason
        actions: list[Action] = [self._set_state(RolloutState.HALTED, now, reason)]
        if self.policy.rollback_on_halt:
            actions += self._revert(
                [self._stage], now, f"rollout {self.rollout_id} halted: {reason}"
            )
        return actions

    def _revert(self, stages: Iterable[int], now: float, reason: str) -> list[Action]:
        """Mark installed devices of ``stages`` REVERTING; SendRollback the online ones."""
        new = [s for s in stages if s not in self._rollback_stages]
        self._rollback_stages = sorted({*self._rollback_stages, *new})
        if self._rollback_reason is None:
            self._rollback_reason = reason
        online = []
        for device_id in sorted(self._devices):
            device = self._devices[device_id]
            installed = device.marker is None and device.install is DeviceState.INSTALLED
            if installed and device.stage in new:
                self._put(replace(device, marker=Marker.REVERTING), now)
                if device.online:
                    online.append(device_id)
        return [SendRollback(sorted_ids(online), reason)] if online else []

    def _check_halt(self, now: float) -> list[Action]:
        """Halt at once if the current stage's failures exceed the whole stage's share."""
        if self._state not in JUDGING_STATES:
            return []
        stats = self._stats(self._stage)
        if not self.policy.stage_fails(stats.failed, stats.size, stats.size):
            return []
        return self._halt(
            now,
            f"{stats.failed} of {stats.size} devices of stage {self._stage} failed; "
            f"at most {self.policy.max_failure * 100:g}% may fail",
        )

    def _judge(self, now: float) -> list[Action]:
        """After the soak, advance, complete, wait, or halt (module docstring)."""
        soak_from = self._stages[self._stage].soak_from
        if soak_from is None or now < soak_from + self.policy.soak_s:
            return []
        stats = self._stats(self._stage)
        if stats.reported < min(self.policy.min_reports, stats.size):
            return []
        if not self.policy.stage_fails(stats.failed, stats.reported, stats.size):
            if self._stage + 1 < len(self._stages):
                self._stage += 1
                return self._release(self._stage, now)
            return [self._set_state(RolloutState.COMPLETED, now, "every stage passed")]
        if stats.undecided_online:
            return []
        return self._halt(
            now,
            f"{stats.failed} of {stats.reported} reporting devices of stage {self._stage} "
            f"failed after the soak; at most {self.policy.max_failure * 100:g}% may fail",
        )

    def _expire(self, now: float) -> None:
        timeout = self.policy.install_timeout_s
        for device_id in sorted(self._devices):
            device = self._devices[device_id]
            if (
                device.marker is None
                and device.online
                and device.install in IN_PROGRESS_STATES
                and device.deployed_at is not None
                and now >= device.deployed_at + timeout
            ):
                self._put(
                    replace(
                        device,
                        install=DeviceState.TIMED_OUT,
                        detail=f"still {device.install} {timeout:g}s after the deploy",
                    ),
                    now,
                )

    def _redeploy(self, device: DeviceInRollout, now: float) -> bool:
        """Prepare a catch-up deploy to a released device that just came online."""
        if self._state not in DEPLOYING_STATES or device.marker is not None:
            return False
        if device.install not in (DeviceState.OFFLINE, DeviceState.TIMED_OUT):
            return False
        install = DeviceState.PENDING if device.install is DeviceState.OFFLINE else device.install
        self._put(
            replace(
                device,
                install=install,
                deployed_at=now,
                released_at=now if device.released_at is None else device.released_at,
            ),
            now,
        )
        return True

    # ----------------------------------------------------------------- operations

    def start(self, now: float) -> list[Action]:
        """Start the rollout: release the canary.

        Args:
            now: The coordinator's current time, unix seconds.

        Returns:
            ``StateChanged``, ``StageReleased`` and ``SendDeploy`` to the online canary
            devices (when any).

        Raises:
            RolloutError: The rollout was started (or aborted) already.
        """
        if self._state is not RolloutState.CREATED:
            raise RolloutError(f"rollout {self.rollout_id} is {self._state}; it starts only once")
        self._started_at = now
        actions: list[Action] = [self._set_state(RolloutState.RUNNING, now, "started")]
        return actions + self._release(0, now)

    def pause(self, now: float, actor: str) -> list[Action]:
        """Stop releasing new stages (catch-ups of released devices continue).

        Args:
            now: The coordinator's current time, unix seconds.
            actor: Who asks (for the audit log).

        Returns:
            ``StateChanged``, or nothing if already paused.

        Raises:
            RolloutError: The rollout is not running.
        """
        if self._state is RolloutState.PAUSED:
            return []
        if self._state is not RolloutState.RUNNING:
            raise RolloutError(f"rollout {self.rollout_id} is {self._state}; cannot pause it")
        return [self._set_state(RolloutState.PAUSED, now, f"paused by {actor}")]

    def resume(self, now: float, actor: str) -> list[Action]:
        """Let a paused rollout advance again (the soak keeps counting while paused).

        Args:
            now: The coordinator's current time, unix seconds.
            actor: Who asks (for the audit log).

        Returns:
            ``StateChanged``, or nothing if already running.

        Raises:
            RolloutError: The rollout is not paused (halted, aborted and completed
                rollouts never resume; a created one is started with ``start``).
        """
        if self._state is RolloutState.RUNNING:
            return []
        if self._state is not RolloutState.PAUSED:
            extra = f" ({self._halt_reason}); start a new rollout" if self._halt_reason else ""
            raise RolloutError(
                f"rollout {self.rollout_id} is {self._state}{extra}; only a paused rollout resumes"
            )
        return [self._set_state(RolloutState.RUNNING, now, f"resumed by {actor}")]

    def abort(self, now: float, actor: str, *, rollback: bool = False) -> list[Action]:
        """Stop the rollout for good, optionally rolling back every installed device.

        Args:
            now: The coordinator's current time, unix seconds.
            actor: Who asks (for the audit log).
            rollback: Roll back the devices of every released stage that installed
                the new version (offline ones when they come back).

        Returns:
            ``StateChanged`` (unless already aborted) and ``SendRollback`` (if asked and
            any online device installed the version).

        Raises:
            RolloutError: The rollout completed.
        """
        if self._state is RolloutState.COMPLETED:
            raise RolloutError(f"rollout {self.rollout_id} completed; roll the model back instead")
        actions: list[Action] = []
        if self._state is not RolloutState.ABORTED:
            actions.append(self._set_state(RolloutState.ABORTED, now, f"aborted by {actor}"))
        if rollback:
            released = [i for i, s in enumerate(self._stages) if s.released_at is not None]
            actions += self._revert(released, now, f"rollout {self.rollout_id} aborted by {actor}")
        return actions

    def tick(self, now: float) -> list[Action]:
        """Apply the timers: install timeouts, then judge the current stage.

        Args:
            now: The coordinator's current time, unix seconds.

        Returns:
            A halt (``StateChanged``, ``SendRollback``), the next stage
            (``StageReleased``, ``SendDeploy``), completion (``StateChanged``), or
            nothing.
        """
        if self._state is RolloutState.CREATED:
            return []
        self._expire(now)
        actions = self._check_halt(now)
        if self._state is RolloutState.RUNNING:
            actions += self._judge(now)
        return actions

    # ----------------------------------------------------------------- events

    def on_install_status(
        self, device_id: str, state: DeviceState, now: float, *, error: str | None = None
    ) -> list[Action]:
        """Apply a device's install report (rules in the module docstring).

        Args:
            device_id: The reporting device.
            state: The reported state, as the adapter mapped it.
            now: The coordinator's current time, unix seconds.
            error: The device's error code or reason, kept as the device's detail.

        Returns:
            A halt, or a ``SendRollback`` for a device that installed after its stage
            was rolled back, or nothing.
        """
        device = self._devices.get(device_id)
        if device is None or state not in REPORTABLE or device.marker is Marker.WAITING:
            return []
        if device.marker is not None:  # REVERTING, REVERTED, REVERT_FAILED
            if state is DeviceState.ROLLED_BACK and device.marker is not Marker.REVERTED:
                self._put(
                    replace(device, marker=Marker.REVERTED, detail=error or device.detail), now
                )
            elif state in (DeviceState.FAILED, DeviceState.REJECTED) and (
                device.marker is Marker.REVERTING
            ):
                self._put(replace(device, marker=Marker.REVERT_FAILED, detail=error), now)
            return []
        if not admits(device.install, state):
            return []
        updated = replace(device, install=state, detail=error)
        if state is DeviceState.INSTALLED and device.install is not DeviceState.INSTALLED:
            updated = replace(updated, installed_at=now)
        if state is DeviceState.INSTALLED and device.install is DeviceState.INSTALLED:
            updated = replace(updated, detail=device.detail)  # a duplicate keeps the verdict
        if not self._put(updated, now):
            return []
        if state is DeviceState.INSTALLED and device.stage in self._rollback_stages:
            reason = self._rollback_reason or f"rollout {self.rollout_id} rolled back"
            self._put(replace(updated, marker=Marker.REVERTING), now)
            return [SendRollback((device_id,), reason)]  # the report proves it is connected
        return self._check_halt(now) if device.stage == self._stage else []

    def on_health(
        self,
        device_id: str,
        *,
        model: str,
        version: int,
        predictions: int,
        errors: int,
        p95_ms: float,
        now: float,
    ) -> list[Action]:
        """Apply a telemetry window: a baseline, or a health verdict on the new version.

        Windows of other models, with fewer than ``health.min_predictions`` calls
        (``predictions + errors``) or with impossible figures are ignored.

        Args:
            device_id: The reporting device.
            model: Model served in the window.
            version: Its version.
            predictions: Successful inference calls in the window.
            errors: Failed inference calls in the window.
            p95_ms: p95 latency of the successful calls, milliseconds.
            now: The coordinator's current time, unix seconds.

        Returns:
            A halt, or nothing.
        """
        device = self._devices.get(device_id)
        health = self.policy.health
        if (
            device is None
            or model != self.artifact.model
            or min(predictions, errors) < 0
            or not math.isfinite(p95_ms)
            or p95_ms < 0
            or predictions + errors < health.min_predictions
        ):
            return []
        sample = HealthSample(version, predictions, errors, float(p95_ms), now)
        if version != self.artifact.version:
            self._put(device.with_baseline_window(sample), now)
            return []
        if device.marker is not None or device.install is not DeviceState.INSTALLED:
            return []
        problem = health_problem(sample, device.baseline, health)
        if device.health_failed:
            updated = replace(device, last_health=sample)
        elif problem is not None:
            updated = replace(device, last_health=sample, health_failed=True, detail=problem)
        else:
            updated = replace(device, last_health=sample, health_ok=True)
        self._put(updated, now)
        return self._check_halt(now) if device.stage == self._stage else []

    def on_online(self, device_id: str, now: float) -> list[Action]:
        """Note that a device came online; released devices catch up.

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.

        Returns:
            ``SendDeploy`` for a released device that was offline or timed out (while
            the rollout is running, paused or completed), ``SendRollback`` for a
            device whose rollback is pending, or nothing (also when the device was
            online already).
        """
        device = self._devices.get(device_id)
        if device is None or device.online:
            return []
        device = replace(device, online=True)
        self._put(device, now)
        if device.marker is Marker.REVERTING:
            return [SendRollback((device_id,), self._rollback_reason or "rollout rolled back")]
        return [SendDeploy((device_id,))] if self._redeploy(device, now) else []

    def on_offline(self, device_id: str, now: float) -> list[Action]:
        """Note that a device went offline: one still installing becomes ``offline``.

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.

        Returns:
            Nothing (a list for symmetry with the other events).
        """
        device = self._devices.get(device_id)
        if device is not None and device.online:
            self._put(device.gone_offline(), now)
        return []

    def add_device(self, device_id: str, now: float, *, online: bool) -> list[Action]:
        """Take a device that joined the target (placement in the module docstring).

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.
            online: Whether it is online now.

        Returns:
            ``SendDeploy`` if its stage is released and it is online, else nothing
            (also for a device already in the rollout, and in a halted or aborted
            rollout, which does not take it).

        Raises:
            RolloutError: The device id is invalid.
        """
        if not is_valid_device_id(device_id):
            raise RolloutError(f"rollout {self.rollout_id}: invalid device id {device_id!r}")
        if device_id in self._devices or self._state in (
            RolloutState.HALTED,
            RolloutState.ABORTED,
        ):
            return []
        # Past the canary: the current stage; else the first wave (or the only stage).
        stage = self._stage or min(1, len(self._stages) - 1)
        self._order.append(device_id)
        device = DeviceInRollout(device_id, stage, online=online, updated_at=now)
        self._devices[device_id] = device
        self._updated_at = now
        info = self._stages[stage]
        if info.released_at is None:
            return []
        if online and self._state in DEPLOYING_STATES:
            if self._state in JUDGING_STATES:
                self._stages[stage] = replace(info, soak_from=now)
            self._put(device.released(now), now)
            return [SendDeploy((device_id,))]
        self._put(replace(device, marker=None, install=DeviceState.OFFLINE), now)
        return []

    def resume_after_restart(self, now: float, online: Collection[str]) -> list[Action]:
        """Re-send what a restarted service may have lost.

        Presence is first reconciled with ``online`` (devices that went offline
        meanwhile become ``offline`` if still installing; devices that came back
        catch up as in :meth:`on_online`). Then every released online device
        still installing gets ``SendDeploy`` again (an agent resumes its transfer, or
        answers ``installed`` again), and every online ``reverting`` device gets
        ``SendRollback`` again. Install timeouts keep counting from the last deploy
        sent before the restart.

        Args:
            now: The coordinator's current time, unix seconds.
            online: Devices online now.

        Returns:
            At most one ``SendDeploy`` and one ``SendRollback``.
        """
        deploy: list[str] = []
        for device_id in sorted(self._devices):
            device = self._devices[device_id]
            is_online = device_id in online
            if device.online and not is_online:
                self._put(device.gone_offline(), now)
            elif is_online and not device.online:
                device = replace(device, online=True)
                self._put(device, now)
                if self._redeploy(device, now):
                    deploy.append(device_id)
            elif (
                is_online
                and self._state in DEPLOYING_STATES
                and device.marker is None
                and device.install in IN_PROGRESS_STATES
            ):
                deploy.append(device_id)
        reverting = [
            d.device_id for d in self._devices.values() if d.marker is Marker.REVERTING and d.online
        ]
        actions: list[Action] = []
        if deploy:
            actions.append(SendDeploy(sorted_ids(deploy)))
        if reverting:
            reason = self._rollback_reason or f"rollout {self.rollout_id} rolled back"
            actions.append(SendRollback(sorted_ids(reverting), reason))
        return actions
