"""The coordinator's persistent state, in SQLite (stdlib :mod:`sqlite3`).

Workflow of the service (``fedge coordinator serve``):

1. At start-up, :meth:`Store.open` opens ``state.db`` (WAL mode), applies any
   missing schema migrations, and refuses a database written by a newer fedge.
   The service then calls :meth:`Store.mark_interrupted_runs` and resumes the
   rollouts returned by ``store.rollouts(states=<non-terminal states>)`` from
   their saved snapshots.
2. While running, from several threads at once (MQTT callbacks, the HTTP API's
   thread pool, a scheduler): the MQTT side records presence with
   :meth:`Store.upsert_device` and flushes buffered telemetry with
   :meth:`Store.add_telemetry` (one transaction per flush); the rollout engine
   stores its whole state with :meth:`Store.save_rollout` after every change and
   takes its devices' health baselines from :meth:`Store.baselines`; federated runs record
   each round; the API authenticates requests with :meth:`Store.authenticate`
   and appends to the audit log. A scheduler calls :meth:`Store.prune_telemetry`.
3. At shutdown, :meth:`Store.close`.

Every write is one transaction: after a crash (even SIGKILL) the database holds
each completed call entirely and no partial one. Artifact bytes are files in
``artifacts/`` next to the database, checked against their sha256 on every read.
Times are unix seconds given by the caller; the store never reads the clock.
Errors are :class:`~coordinator.errors.StoreError` and its subclasses.

Modules: :mod:`~coordinator.service.store.database` (connection, transactions,
migrations), :mod:`~coordinator.service.store.schema` (the SQL),
:mod:`~coordinator.service.store.records` (returned rows), and one mixin module per table
group (:mod:`~coordinator.service.store.fleet`, :mod:`~coordinator.service.store.deploy`,
:mod:`~coordinator.service.store.runs`, :mod:`~coordinator.service.store.access`,
:mod:`~coordinator.service.store.drift`,
:mod:`~coordinator.service.store.registry`,
:mod:`~coordinator.service.store.policies`).
"""

from coordinator.service.store.access import LAST_USED_RESOLUTION_S
from coordinator.service.store.database import MEMORY, Database, Migration
from coordinator.service.store.fleet import KEEP, Keep
from coordinator.service.store.policies import PolicyRow, RetrainingRow
from coordinator.service.store.records import (
    ArtifactRow,
    AuditRow,
    DeviceRow,
    PresenceRow,
    RolloutDevice,
    RolloutInfo,
    RolloutRow,
    RoundRow,
    RunRow,
    RunState,
    TelemetryRow,
    TokenRow,
)
from coordinator.service.store.schema import MIGRATIONS, SCHEMA_VERSION
from coordinator.service.store.store import ARTIFACT_DIR_NAME, Store

__all__ = [
    "ARTIFACT_DIR_NAME",
    "KEEP",
    "LAST_USED_RESOLUTION_S",
    "MEMORY",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ArtifactRow",
    "AuditRow",
    "Database",
    "DeviceRow",
    "Keep",
    "Migration",
    "PolicyRow",
    "PresenceRow",
    "RetrainingRow",
    "RolloutDevice",
    "RolloutInfo",
    "RolloutRow",
    "RoundRow",
    "RunRow",
    "RunState",
    "Store",
    "TelemetryRow",
    "TokenRow",
]
