"""The fleet's figures for ``GET /metrics``: :func:`fleet_metrics`.

One pass over what the service knows, gathered into a
:class:`~coordinator.service.operations.FleetMetrics`:

* devices online (from the hub's fleet view) and devices ever seen (the store),
  and the models the online devices serve, by name and version;
* rollouts by state, and for each one still going (created, running, paused) its
  stage and its devices by state (from the rollout manager's live view);
* the rounds of the latest federated run;
* the ingest's latency and stored-telemetry count;
* the fleet's drift figures and the windows the drift monitor refused.

Nothing is written: :meth:`~coordinator.service.fleet_service.FleetService.metrics`
calls it with its parts.
"""

from __future__ import annotations

from coordinator.link.port import Hub
from coordinator.rollout.manager import RolloutManager
from coordinator.service.drift import DriftMonitor
from coordinator.service.ingest import Ingest
from coordinator.service.operations import FleetMetrics
from coordinator.service.store import Store

__all__ = ["fleet_metrics"]

_GOING = frozenset({"created", "running", "paused"})
"""Rollout states whose progress ``/metrics`` shows device by device."""


def fleet_metrics(
    hub: Hub, store: Store, rollouts: RolloutManager, ingest: Ingest, drift: DriftMonitor
) -> FleetMetrics:
    """Figures for ``GET /metrics`` (devices, models, rollouts, rounds, latency, drift).

    Raises:
        StoreError: the database failed.
    """
    records = hub.fleet()
    models: dict[tuple[str, int], int] = {}
    for record in records:
        if record.online:
            for model in record.models:
                key = (model.name, model.version)
                models[key] = models.get(key, 0) + 1
    states: dict[str, int] = {}
    stages: dict[str, int] = {}
    progress: dict[tuple[str, str], int] = {}
    for row in store.rollouts():
        states[row.state] = states.get(row.state, 0) + 1
        summary = rollouts.summary(row.rollout_id) if row.state in _GOING else None
        if summary is not None:
            stage = summary.get("stage")
            stages[row.rollout_id] = stage if isinstance(stage, int) else 0
            for device in rollouts.devices(row.rollout_id) or ():
                place = (row.rollout_id, device.state)
                progress[place] = progress.get(place, 0) + 1
    runs = store.runs()
    rounds = tuple(store.rounds(runs[0].run_id)) if runs else ()
    fleet_psi, severities = drift.figures()
    return FleetMetrics(
        devices_online=sum(r.online for r in records),
        devices_total=len(store.devices()),
        models=models,
        rollouts=states,
        latency_ms=ingest.latency_ms(),
        telemetry_ingested=ingest.counts().stored,
        rounds=rounds,
        rollout_stages=stages,
        rollout_devices=progress,
        drift_psi=fleet_psi,
        drift_devices=severities,
        drift_rejected=drift.rejected(),
    )
