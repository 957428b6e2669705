"""Store methods for retraining policies and the runs they started.

Part of :class:`coordinator.service.store.Store` (a mixin; see that package's docstring).

``fedge policy set`` writes a :class:`~coordinator.monitoring.policy.Policy` with
:meth:`PolicyTables.set_policy` (one per model name; a second ``set`` replaces it);
``show``, ``list`` and ``delete`` read or remove it. The service's retraining loop
(:mod:`coordinator.service.retraining`) records each run a policy starts with
:meth:`PolicyTables.add_retraining` and moves it along its steps with
:meth:`PolicyTables.update_retraining`; the policy's cooldown and daily budget read
:meth:`PolicyTables.retrainings`, so they hold across a restart.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.errors import ConflictError, NotFoundError
from coordinator.monitoring.policy import Policy
from coordinator.service.store.database import Database, check_finite, dump_json, load_json

__all__ = ["PolicyRow", "PolicyTables", "RetrainingRow"]


@dataclass(frozen=True)
class PolicyRow:
    """A stored policy, who set it and when."""

    policy: Policy
    updated_by: str
    updated_at: float


@dataclass(frozen=True)
class RetrainingRow:
    """A run a policy started, and how far it went.

    Attributes:
        run_id: The federated run (``fedge runs``).
        policy: The policy's name (the model's).
        state: The step it is at or ended on (see
            :mod:`coordinator.service.retraining`).
        trigger: What started it (:attr:`~coordinator.monitoring.policy.Decision.trigger`).
        detail: What each step found (evaluation figures, artifact, rollout id...).
        created_at: When the run started.
        updated_at: When the state last changed.
    """

    run_id: str
    policy: str
    state: str
    trigger: dict[str, Any]
    detail: dict[str, Any]
    created_at: float
    updated_at: float


def _policy(row: sqlite3.Row) -> PolicyRow:
    return PolicyRow(
        Policy.from_dict(load_json(row["policy_json"])), row["updated_by"], row["updated_at"]
    )


def _retraining(row: sqlite3.Row) -> RetrainingRow:
    return RetrainingRow(
        run_id=row["run_id"],
        policy=row["policy"],
        state=row["state"],
        trigger=load_json(row["trigger_json"]),
        detail=load_json(row["detail_json"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class PolicyTables:
    """Retraining policies and runs (mixed into :class:`~coordinator.service.store.Store`)."""

    _db: Database

    def set_policy(self, policy: Policy, *, updated_by: str, at: float) -> PolicyRow:
        """Store ``policy``, replacing the model's previous one.

        Raises:
            StoreError: The database failed.
        """
        check_finite("at", at)
        document = dump_json(policy.to_dict(), "policy")
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO retraining_policies (name, policy_json, updated_by, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "policy_json = excluded.policy_json, updated_by = excluded.updated_by, "
                "updated_at = excluded.updated_at",
                (policy.name, document, updated_by, at),
            )
        return PolicyRow(policy, updated_by, at)

    def policy(self, name: str) -> PolicyRow:
        """The policy of model ``name``.

        Raises:
            NotFoundError: There is none.
            StoreError: The database failed.
        """
        row = self._db.one("SELECT * FROM retraining_policies WHERE name = ?", (name,))
        if row is None:
            raise NotFoundError(f"no retraining policy for model {name!r}")
        return _policy(row)

    def policies(self) -> list[PolicyRow]:
        """Every policy, by name.

        Raises:
            StoreError: The database failed.
        """
        return [
            _policy(r) for r in self._db.rows("SELECT * FROM retraining_policies ORDER BY name")
        ]

    def delete_policy(self, name: str) -> PolicyRow:
        """Remove the policy of model ``name`` (its runs' records stay); give it.

        Raises:
            NotFoundError: There is none.
            StoreError: The database failed.
        """
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM retraining_policies WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no retraining policy for model {name!r}")
            conn.execute("DELETE FROM retraining_policies WHERE name = ?", (name,))
        return _policy(row)

    def add_retraining(
        self, run_id: str, *, policy: str, state: str, trigger: Mapping[str, Any], at: float
    ) -> RetrainingRow:
        """Record a run ``policy`` started.

        Raises:
            ConflictError: The run is recorded already.
            StoreError: The trigger cannot be stored as JSON, or the database failed.
        """
        check_finite("at", at)
        document = dump_json(dict(trigger), "trigger")
        with self._db.transaction() as conn:
            if conn.execute("SELECT 1 FROM retraining_runs WHERE run_id = ?", (run_id,)).fetchone():
                raise ConflictError(f"retraining run {run_id!r} already recorded")
            conn.execute(
                "INSERT INTO retraining_runs (run_id, policy, state, trigger_json, detail_json, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, '{}', ?, ?)",
                (run_id, policy, state, document, at, at),
            )
        return RetrainingRow(run_id, policy, state, dict(trigger), {}, at, at)

    def update_retraining(
        self, run_id: str, *, state: str, detail: Mapping[str, Any], at: float
    ) -> RetrainingRow:
        """Move a retraining run to ``state``, merging ``detail`` into what it holds.

        Raises:
            NotFoundError: No such retraining run.
            StoreError: ``detail`` cannot be stored as JSON, or the database failed.
        """
        check_finite("at", at)
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM retraining_runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no retraining run {run_id!r}")
            merged = {**load_json(row["detail_json"]), **detail}
            conn.execute(
                "UPDATE retraining_runs SET state = ?, detail_json = ?, updated_at = ? "
                "WHERE run_id = ?",
                (state, dump_json(merged, "detail"), at, run_id),
            )
        current = _retraining(row)
        return RetrainingRow(
            run_id, current.policy, state, current.trigger, merged, current.created_at, at
        )

    def retraining(self, run_id: str) -> RetrainingRow:
        """One retraining run.

        Raises:
            NotFoundError: No such retraining run.
            StoreError: The database failed.
        """
        row = self._db.one("SELECT * FROM retraining_runs WHERE run_id = ?", (run_id,))
        if row is None:
            raise NotFoundError(f"no retraining run {run_id!r}")
        return _retraining(row)

    def retrainings(self, *, policy: str | None = None) -> list[RetrainingRow]:
        """Retraining runs, newest first; only ``policy``'s when given.

        Raises:
            StoreError: The database failed.
        """
        rows = self._db.rows(
            "SELECT * FROM retraining_runs WHERE (? IS NULL OR policy = ?) "
            "ORDER BY created_at DESC, run_id",
            (policy, policy),
        )
        return [_retraining(row) for row in rows]
