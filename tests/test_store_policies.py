"""The store's retraining policies and runs (schema step 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.errors import ConflictError, NotFoundError, StoreError
from coordinator.monitoring.policy import Policy, RunSettings
from coordinator.service.store import MEMORY, SCHEMA_VERSION, Store
from tests.store_support import old_database_with_audit

POLICY = Policy("sensor", drift_psi=0.25, windows=3, run=RunSettings(config={"features": 8}))


def test_a_version_4_database_gains_the_tables_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old_database_with_audit(path, 4)
    with Store.open(path) as store:
        assert store.database.user_version == SCHEMA_VERSION
        assert len(store.audit_log()) == 1
        assert store.policies() == []
        assert store.retrainings() == []


def test_policies_are_set_replaced_read_and_deleted(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store.open(path) as store:
        store.set_policy(POLICY, updated_by="cli:a", at=1.0)
        other = Policy("alpha", drift_severity="major", require_approval=True)
        store.set_policy(other, updated_by="cli:b", at=2.0)
        replaced = Policy("sensor", drift_psi=0.3)
        store.set_policy(replaced, updated_by="cli:c", at=3.0)
    with Store.open(path) as store:  # it survives a restart
        assert [(r.policy, r.updated_by) for r in store.policies()] == [
            (other, "cli:b"), (replaced, "cli:c"),
        ]  # fmt: skip
        assert store.delete_policy("sensor").policy == replaced
        with pytest.raises(NotFoundError, match="no retraining policy for model 'sensor'"):
            store.policy("sensor")
        with pytest.raises(NotFoundError):
            store.delete_policy("sensor")


def test_retraining_runs_keep_their_trigger_and_merge_their_detail(tmp_path: Path) -> None:
    with Store.open(MEMORY, artifact_dir=tmp_path) as store:
        trigger = {"policy": "sensor", "kind": "drift", "value": 0.4}
        store.add_retraining("run-1", policy="sensor", state="training", trigger=trigger, at=5.0)
        store.add_retraining("run-2", policy="other", state="training", trigger={}, at=6.0)
        with pytest.raises(ConflictError):
            store.add_retraining("run-1", policy="sensor", state="training", trigger={}, at=7.0)
        store.update_retraining("run-1", state="trained", detail={"run_state": "finished"}, at=8.0)
        row = store.update_retraining("run-1", state="failed", detail={"x": 1}, at=9.0)
        assert row.detail == {"run_state": "finished", "x": 1}
        assert store.retraining("run-1") == row
        assert row.trigger == trigger
        assert row.created_at == 5.0
        assert [r.run_id for r in store.retrainings()] == ["run-2", "run-1"]
        assert [r.run_id for r in store.retrainings(policy="sensor")] == ["run-1"]
        with pytest.raises(NotFoundError):
            store.update_retraining("ghost", state="x", detail={}, at=1.0)
        with pytest.raises(StoreError):
            store.add_retraining("run-3", policy="p", state="s", trigger={"v": float("nan")},
                                 at=1.0)  # fmt: skip
