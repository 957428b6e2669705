"""Drift scores in the store: migration 4, latest per subject, history, retention."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from coordinator.errors import StoreError
from coordinator.monitoring.scores import DEVICE, FLEET, DriftScore, FeatureDrift
from coordinator.service.store import MEMORY, SCHEMA_VERSION, Store
from tests.store_support import old_database_with_audit


def score(
    device: str | None, *, at: float, psi: float = 0.05, model: str = "m", version: int = 1
) -> DriftScore:
    return DriftScore(
        scope=DEVICE if device else FLEET,
        device_id=device,
        model=model,
        version=version,
        at=at,
        windows=2,
        n=100,
        psi_max=psi,
        js_max=psi / 10,
        severity="none",
        top=(FeatureDrift(3, psi, psi / 10),),
        confidence_psi=None,
        classes_psi=0.01,
        invalid={"nan": 1},
        devices=("a",) if device is None else (),
    )


def test_a_version_3_database_gains_the_table_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old_database_with_audit(path, 3)
    with Store.open(path) as store:
        assert store.database.user_version == SCHEMA_VERSION
        assert len(store.audit_log()) == 1
        assert store.drift_scores() == []


def test_latest_per_subject_filters_and_history(tmp_path: Path) -> None:
    with Store.open(MEMORY, artifact_dir=tmp_path) as store:
        store.add_drift_scores([score("a", at=1.0), score("b", at=1.0), score(None, at=1.0)])
        store.add_drift_scores([score("a", at=2.0, psi=0.3), score(None, at=2.0, psi=0.2)])
        store.add_drift_scores([score("a", at=3.0, model="other")])
        store.add_drift_scores([score("a", at=3.0, version=2)])
        latest = store.drift_scores()
        assert [(s.scope, s.device_id, s.model, s.version, s.at) for s in latest] == [
            (FLEET, None, "m", 1, 2.0),
            (DEVICE, "a", "m", 2, 3.0),
            (DEVICE, "a", "m", 1, 2.0),
            (DEVICE, "b", "m", 1, 1.0),
            (DEVICE, "a", "other", 1, 3.0),
        ]
        assert latest[0] == score(None, at=2.0, psi=0.2)
        mine = store.drift_scores(device_id="a", model="m")
        assert [(s.version, s.psi_max) for s in mine] == [(2, 0.05), (1, 0.3)]
        assert store.drift_scores(device_id="nobody") == []
        history = store.drift_history(model="m", version=1, device_id="a")
        assert [s.at for s in history] == [2.0, 1.0]
        assert [s.at for s in store.drift_history(model="m", version=1)] == [2.0, 1.0]
        assert store.prune_drift(older_than=2.5) == 2  # a's and the fleet's first
        assert [s.at for s in store.drift_history(model="m", version=1, device_id="a")] == [2.0]
        assert store.drift_history(model="m", version=1, device_id="b")  # latest stays


def test_prune_by_row_count_keeps_each_subjects_latest(tmp_path: Path) -> None:
    with Store.open(MEMORY, artifact_dir=tmp_path) as store:
        store.add_drift_scores([score("a", at=float(t)) for t in range(5)])
        store.add_drift_scores([score("b", at=5.0), score(None, at=5.0)])
        assert store.prune_drift(max_rows=4) == 3  # a's three oldest
        assert [s.at for s in store.drift_history(model="m", version=1, device_id="a")] == [
            4.0,
            3.0,
        ]
        assert store.prune_drift(max_rows=0) == 1  # a's 3.0; every latest stays
        assert len(store.drift_scores()) == 3
        with pytest.raises(ValueError, match="max_rows"):
            store.prune_drift(max_rows=-1)


def test_non_finite_scores_are_refused_whole(tmp_path: Path) -> None:
    with Store.open(MEMORY, artifact_dir=tmp_path) as store:
        with pytest.raises(StoreError, match="finite"):
            store.add_drift_scores([score("a", at=1.0), score("b", at=1.0, psi=math.nan)])
        assert store.drift_scores() == []
        store.add_drift_scores([])
