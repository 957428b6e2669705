"""One-shot deliveries the service runs for an operator: ``fedge deploy`` and ``rollback``.

:class:`OneShots` is the part of :class:`~coordinator.service.fleet_service.FleetService`
behind :meth:`~coordinator.service.operations.Operations.deploy`,
:meth:`~coordinator.service.operations.Operations.rollback` and
:meth:`~coordinator.service.operations.Operations.deployment`. Workflow::

    one_shots = OneShots(deliveries)
    view = one_shots.deploy(artifact, target, timeout_s=120)   # command sent, payload pushed
    one_shots.view(view.result.deployment_id)                   # poll: progress so far
    one_shots.stop()                                            # the service stops

1. :meth:`OneShots.deploy` (or :meth:`~OneShots.rollback`) starts the delivery through
   :class:`~coordinator.delivery.deliveries.Deliveries` in the caller's thread, so a bad
   target fails the call itself; for a deploy the call returns once the devices
   answered (or the accept wait passed) and the payload went out.
2. A background thread then waits for the devices' outcomes
   (:meth:`Deliveries.wait <coordinator.delivery.deliveries.Deliveries.wait>`, with the
   request's timeout) and keeps a snapshot of their progress at every change:
   :meth:`OneShots.view` returns the latest, ``done`` once every device has an outcome
   or the timeout passed.
3. :meth:`OneShots.stop` ends the waits still going (their views become ``done``
   as they stand) and joins the threads.

Views are kept in memory only, the last :data:`KEPT` finished ones: a restarted
service forgets them (what each device runs is in its status; the request is in
the audit log).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from coordinator.delivery.deliveries import Artifact, Deliveries, Delivery
from coordinator.delivery.tracker import DeploymentTracker, DeployResult, DeviceState
from coordinator.errors import NotFoundError
from coordinator.link.fleet import Target
from coordinator.service.operations import DeploymentView

__all__ = ["KEPT", "OneShots"]

logger = logging.getLogger(__name__)

KEPT = 100
"""Finished one-shot deliveries whose views are kept (the oldest go first)."""

_MOVING = (DeviceState.PENDING, DeviceState.ACCEPTED, DeviceState.DOWNLOADING)
"""States of a device that does not have the payload yet and has not refused it."""


@dataclass
class _Job:
    """One delivery followed in the background: its latest view and its thread."""

    view: DeploymentView
    thread: threading.Thread | None = None


def _delivered(delivery: Delivery) -> bool:
    """Whether every device has the payload or refused it (dropped-out ones: not yet)."""
    if delivery.artifact is None:
        return True
    return not delivery.dropped_out() and all(
        p.state not in _MOVING for p in delivery.tracker.progress()
    )


class OneShots:
    """One-shot deployments and rollbacks followed in the background (thread-safe)."""

    def __init__(self, deliveries: Deliveries, *, kept: int = KEPT) -> None:
        """Send through ``deliveries`` (whose owner closes it after :meth:`stop`)."""
        self._deliveries = deliveries
        self._kept = kept
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}  # in creation order
        self._stopping = threading.Event()

    def deploy(self, artifact: Artifact, target: Target, *, timeout_s: float) -> DeploymentView:
        """Send an artifact to the targeted devices and follow them (module docstring).

        Raises:
            TargetError: no device matches the target, or it names unknown devices.
        """
        return self._follow(self._deliveries.deploy(artifact, target), timeout_s)

    def rollback(
        self, target: Target, model: str, *, reason: str, timeout_s: float
    ) -> DeploymentView:
        """Ask the targeted devices to go back to their previous model, and follow them.

        Raises:
            TargetError: no device matches the target.
        """
        return self._follow(self._deliveries.rollback(target, model, reason=reason), timeout_s)

    def view(self, deployment_id: str) -> DeploymentView:
        """The latest view of a delivery started here.

        Raises:
            NotFoundError: none with this id (or it was dropped, see :data:`KEPT`).
        """
        with self._lock:
            job = self._jobs.get(deployment_id)
            if job is None:
                raise NotFoundError(f"no deployment {deployment_id!r}")
            return job.view

    def stop(self) -> None:
        """End the waits still going and join their threads (idempotent)."""
        self._stopping.set()
        with self._lock:
            threads = [job.thread for job in self._jobs.values() if job.thread is not None]
        for thread in threads:
            thread.join()

    def _follow(self, delivery: Delivery, timeout_s: float) -> DeploymentView:
        deployment_id = delivery.deployment_id
        first = threading.Event()

        def snapshot(tracker: DeploymentTracker) -> None:
            # Called by Deliveries.wait under its lock: the tracker is consistent.
            view = DeploymentView(tracker.result(), done=False, delivered=_delivered(delivery))
            with self._lock:
                self._jobs[deployment_id].view = view
            first.set()

        def wait() -> None:
            try:
                result = self._deliveries.wait(
                    delivery,
                    timeout=timeout_s,
                    on_change=snapshot,
                    until=lambda _tracker: self._stopping.is_set(),
                )
            except Exception:  # a bug: the view ends as it stands rather than hang
                logger.exception("following deployment %s failed", deployment_id)
                with self._lock:
                    result = self._jobs[deployment_id].view.result
            finally:
                first.set()
            with self._lock:
                job = self._jobs[deployment_id]
                job.view = DeploymentView(result, done=True, delivered=job.view.delivered)
                job.thread = None
                self._drop_old()
            logger.info("deployment %s done: succeeded=%s", deployment_id, result.succeeded)

        thread = threading.Thread(target=wait, name=f"fedge-deploy-{deployment_id}", daemon=True)
        with self._lock:
            tracker = delivery.tracker  # its name and version are fixed; its progress is not
            nothing = DeployResult(deployment_id, tracker.model, tracker.version, False, ())
            placeholder = DeploymentView(nothing, done=False, delivered=False)
            self._jobs[deployment_id] = _Job(placeholder, thread)
        thread.start()
        first.wait()
        return self.view(deployment_id)

    def _drop_old(self) -> None:
        """Forget the oldest finished views beyond :data:`KEPT` (lock held)."""
        finished = [key for key, job in self._jobs.items() if job.view.done]
        for key in finished[: max(0, len(finished) - self._kept)]:
            del self._jobs[key]
