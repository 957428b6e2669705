"""How the coordinator service runs: :class:`ServiceSettings`.

The ``[telemetry]``, ``[rollouts]``, ``[federated]``, ``[monitoring]`` and ``[fleet]``
sections of the service's config (:mod:`coordinator.service.config`) become one
:class:`ServiceSettings`, which :class:`~coordinator.service.fleet_service.FleetService`
hands to its parts: the ingest settings (:meth:`ServiceSettings.ingest`), the drift
window count, the rollout engine's timings, the run manager's upload budget and
spool, and the fleet statement whose keys also sign retrained models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.delivery.deliveries import ACCEPT_WAIT_S
from coordinator.delivery.fleet_statement import StatementSettings
from coordinator.monitoring.tracker import DEFAULT_WINDOWS
from coordinator.rollout.policy import DEFAULT_MIN_FAILED_DEVICES
from coordinator.service.drift import FLEET_EVERY_S
from coordinator.service.ingest import IngestSettings

__all__ = ["ServiceSettings"]


@dataclass(frozen=True)
class ServiceSettings:
    """How the service runs (the ``[telemetry]`` and ``[rollouts]`` of its config).

    Attributes:
        telemetry_flush_s: Telemetry is written to SQLite in batches this often.
        telemetry_max_rows: Retention by row count (None: no limit).
        telemetry_max_age_s: Retention by age, seconds (None: no limit).
        prune_every_s: Seconds between retention passes.
        drift_windows: Windows of each device pooled into its drift score.
        rollout_tick_s: Seconds between rollout engine ticks (soak, timeouts).
        accept_wait_s: How long a rollout's deploy waits for the devices' answers
            before pushing the payload.
        rollout_min_failed_devices: A rollout's ``min_failed_devices`` when its
            request gives none (see :mod:`coordinator.rollout.policy`).
        upload_budget_bytes: Most bytes of chunked uploads one device may have in
            flight during a federated run; None for 4x the largest update.
        upload_dir: Where a run's chunked uploads are spooled on disk; None for
            the per-user default (:mod:`coordinator.federated.spool`).
        fleet: The fleet statement to keep published and to name each deploy in
            (:mod:`coordinator.delivery.fleet_statement`); None for none. Its keys
            also sign retrained models: without them no retraining policy is set.
        retraining_every_s: Seconds between evaluations of the retraining
            policies (:mod:`coordinator.service.retraining`).
        drift_fleet_every_s: Least seconds between two stored fleet drift scores
            of a version whose severity is unchanged (``fedge simulate --scenario``
            shortens it with its fast telemetry).
    """

    telemetry_flush_s: float = 0.5
    telemetry_max_rows: int | None = 1_000_000
    telemetry_max_age_s: float | None = 7 * 86400.0
    prune_every_s: float = 60.0
    drift_windows: int = DEFAULT_WINDOWS
    rollout_tick_s: float = 1.0
    accept_wait_s: float = ACCEPT_WAIT_S
    rollout_min_failed_devices: int = DEFAULT_MIN_FAILED_DEVICES
    upload_budget_bytes: int | None = None
    upload_dir: Path | None = None
    fleet: StatementSettings | None = None
    retraining_every_s: float = 5.0
    drift_fleet_every_s: float = FLEET_EVERY_S

    def ingest(self) -> IngestSettings:
        """The ingest settings these imply.

        Raises:
            ValueError: a value out of range.
        """
        return IngestSettings(
            flush_s=self.telemetry_flush_s,
            max_rows=self.telemetry_max_rows,
            max_age_s=self.telemetry_max_age_s,
            prune_every_s=self.prune_every_s,
        )
