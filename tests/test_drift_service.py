"""Drift in the service: telemetry summaries through ingest, scored against the stored
artifact's reference profile, kept in the store (in-memory store, no broker).

Devices summarise their inputs the way an agent does (compress.profile's features and
bins against the manifest's profile); each batch goes through the wire codec first.
A covariate shift (gain and offset on half of the inputs) raises the shifted device's
drift to "major" within a few windows while two control devices stay at "none".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from compress.profile import (
    BINS,
    ReferenceProfile,
    profile_from_data,
)
from coordinator.link.memory import MemoryHub
from coordinator.monitoring.drift import PSI_MAJOR, PSI_MODERATE
from coordinator.monitoring.tracker import DriftTracker
from coordinator.service.api import create_app
from coordinator.service.drift import EXPIRE_EVERY_S, WINDOW_MAX_AGE_S, DriftMonitor
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.ingest import Ingest
from coordinator.service.store import MEMORY, Store
from coordinator.service.tokens import Role
from edge_agent.protocol import (
    InvalidCounts,
    TelemetryBatch,
    WindowSummary,
    decode,
    encode,
)
from tests.api_support import TestClient, bearer
from tests.clock_support import ManualClock
from tests.drift_support import agent_summary, summary_batch

D, K = 8, 3
WINDOW = 200
"""Inputs per telemetry window."""
rng = np.random.default_rng(18)
WEIGHTS = rng.normal(size=(D, K)).astype(np.float32)


def model(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(x @ WEIGHTS, dtype=np.float32)


def data(n: int, rng: np.random.Generator, *, shifted: bool = False) -> npt.NDArray[np.float32]:
    x = rng.normal(size=(n, D)).astype(np.float32)
    if shifted:  # a sensor's gain and offset change on half of the inputs
        x[:, : D // 2] = 1.5 * x[:, : D // 2] + 1.0
    return x


def sensor_profile() -> ReferenceProfile:
    """The reference profile of the ``sensor`` model, from 4000 seeded inputs."""
    x = data(4000, np.random.default_rng(0))
    return profile_from_data(x, model(x), "classification")


@contextmanager
def sensor_store(tmp_path: Path, profile: ReferenceProfile) -> Iterator[Store]:
    """An in-memory store holding the ``sensor`` v2 artifact with ``profile``."""
    with Store.open(MEMORY, artifact_dir=tmp_path) as store:
        manifest = {"name": "sensor", "version": 2, "reference": profile.to_dict()}
        store.put_artifact(b"model bytes", name="sensor", version=2, manifest=manifest,
                           uploaded_by="cli:test", at=1.0)  # fmt: skip
        yield store


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return sensor_profile()


@pytest.fixture
def store(tmp_path: Path, profile: ReferenceProfile) -> Iterator[Store]:
    with sensor_store(tmp_path, profile) as store:
        yield store


def summarise(profile: ReferenceProfile, x: npt.NDArray[np.float32]) -> WindowSummary:
    """What an agent's window summary holds after serving ``x``."""
    return agent_summary(profile, x, model(x), classes=K)


def wire(summary: WindowSummary, *, seq: int, version: int = 2) -> TelemetryBatch:
    """A telemetry batch with one summarised window, through the wire codec and back."""
    batch = summary_batch(
        summary, seq=seq, model="sensor", version=version, start=10.0 * seq, end=10.0 * seq + 10
    )
    message = decode(encode(batch, sender="dev", sent_at=1.0)).message
    assert isinstance(message, TelemetryBatch)
    return message


def test_a_shifted_device_drifts_and_the_controls_raise_no_alarm(
    store: Store, profile: ReferenceProfile
) -> None:
    clock = ManualClock(5000.0)
    monitor = DriftMonitor(store, DriftTracker(windows=4), clock=clock)
    ingest = Ingest(store, clock=clock, drift=monitor.add_windows)
    rng = np.random.default_rng(1)
    for seq in range(6):
        for device in ("control-1", "control-2", "shifted"):
            x = data(WINDOW, rng, shifted=device == "shifted" and seq >= 2)
            ingest.add_telemetry(device, wire(summarise(profile, x), seq=seq))
        ingest.flush()
        clock.now += 10
        if seq == 1:  # before the shift: nothing drifts (400 inputs a device: too few)
            before = {s.device_id: s.severity for s in store.drift_scores()}
            devices = ("control-1", "control-2", "shifted")
            assert before == {None: "none", **dict.fromkeys(devices, "insufficient")}
    latest = {s.device_id: s for s in store.drift_scores()}
    shifted = latest["shifted"]
    assert shifted.severity == "major"
    assert shifted.psi_max >= PSI_MAJOR
    assert {f.index for f in shifted.top[:4]} == set(range(D // 2))  # the shifted inputs
    assert shifted.windows == 4
    assert shifted.n == 4 * WINDOW
    for control in ("control-1", "control-2"):  # false alarms: 0
        assert latest[control].severity == "none"
        assert latest[control].psi_max < PSI_MODERATE
    fleet = latest[None]
    assert fleet.scope == "fleet"
    assert fleet.devices[0] == "shifted"
    assert fleet.psi_max >= PSI_MODERATE
    assert store.telemetry_count() == 18
    # The history shows the onset: the shifted device's score rose window by window.
    history = store.drift_history(model="sensor", version=2, device_id="shifted")
    assert [round(s.at) for s in history] == [5050, 5040, 5030, 5020, 5010, 5000]
    assert history[-1].severity == "insufficient"  # 200 inputs
    assert history[0].psi_max > history[3].psi_max
    fleet_psi, severities = monitor.figures()
    assert fleet_psi == {("sensor", 2): fleet.psi_max}
    assert severities == {("sensor", 2, "none"): 2, ("sensor", 2, "major"): 1}


def test_hostile_and_unknown_summaries_are_refused_per_device(
    store: Store, profile: ReferenceProfile, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(5000.0)
    monitor = DriftMonitor(store, clock=clock)
    ingest = Ingest(store, clock=clock, drift=monitor.add_windows)
    rng = np.random.default_rng(2)
    good = summarise(profile, data(WINDOW, rng))
    wrong_features = WindowSummary.from_arrays(
        n=10, features=np.full((5, BINS), 1), confidence=None, classes=None,
        invalid=InvalidCounts(),
    )  # fmt: skip
    wrong_classes = WindowSummary.from_arrays(
        n=10, features=np.full((D, BINS), 1), confidence=np.full(BINS, 1),
        classes=np.array([5, 5]), invalid=InvalidCounts(),
    )  # fmt: skip
    no_confidence = WindowSummary.from_arrays(  # the profile has one: the protocol's rule
        n=good.n, features=good.feature_counts(), confidence=None, classes=good.classes,
        invalid=InvalidCounts(),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        ingest.add_telemetry("good", wire(good, seq=0))
        ingest.add_telemetry("evil", wire(wrong_features, seq=0))
        ingest.add_telemetry("evil", wire(wrong_classes, seq=1))
        ingest.add_telemetry("evil", wire(no_confidence, seq=2))
        ingest.add_telemetry("other", wire(good, seq=0, version=9))  # no artifact stored
        ingest.flush()
    assert {(s.scope, s.device_id) for s in store.drift_scores()} == {
        ("device", "good"),
        ("fleet", None),
    }
    assert monitor.rejected() == {"wrong_features": 1, "wrong_shape": 2, "no_reference": 1}
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3
    assert "confidence False != profile's True" in refusals[2]
    assert all("device evil" in message for message in refusals)
    assert store.telemetry_count() == 5  # the telemetry itself is stored all the same


def test_a_stored_profile_that_is_not_one_is_logged_and_skipped(
    tmp_path: Path, profile: ReferenceProfile, caplog: pytest.LogCaptureFixture
) -> None:
    with Store.open(MEMORY, artifact_dir=tmp_path) as store:
        broken = {**profile.to_dict(), "bins": 3}
        manifest = {"name": "sensor", "version": 2, "reference": broken}
        store.put_artifact(b"x", name="sensor", version=2, manifest=manifest,
                           uploaded_by="cli:test", at=1.0)  # fmt: skip
        monitor = DriftMonitor(store)
        summary = summarise(profile, data(WINDOW, np.random.default_rng(3)))
        with caplog.at_level(logging.ERROR):
            assert monitor.add_windows([("d", wire(summary, seq=0).records[0])]) == []
        assert "unusable reference" in caplog.text
        assert monitor.rejected() == {"no_reference": 1}
        assert store.drift_scores() == []


def test_fleet_scores_are_stored_every_30_s_or_when_their_severity_changes(
    store: Store, profile: ReferenceProfile
) -> None:
    clock = ManualClock(5000.0)
    monitor = DriftMonitor(store, clock=clock)
    rng = np.random.default_rng(4)
    fleet_rows = []
    for seq in range(16):  # one flush every 5 s; the shift starts at the 4th
        x = data(WINDOW * 3, rng, shifted=seq >= 3)
        stored = monitor.add_windows([("d", wire(summarise(profile, x), seq=seq).records[0])])
        assert stored[0].scope == "device"  # every device score is stored
        fleet_rows += [(round(s.at - 5000), s.severity) for s in stored if s.scope == "fleet"]
        clock.now += 5
    # First, then on each change of severity, then 30 s after the last one.
    assert fleet_rows == [(0, "none"), (15, "moderate"), (25, "major"), (55, "major")]
    history = store.drift_history(model="sensor", version=2)
    assert [round(s.at - 5000) for s in history] == [55, 25, 15, 0]
    assert len(store.drift_history(model="sensor", version=2, device_id="d")) == 16


def test_the_http_api_over_the_real_service_shows_drift(
    store: Store, profile: ReferenceProfile
) -> None:
    clock = ManualClock(5000.0)
    service = FleetService(store, MemoryHub(), None, clock=clock)
    _row, viewer = store.add_token("dashboard", Role.VIEWER, clock.now)
    rng = np.random.default_rng(5)
    for seq in range(4):
        for device in ("calm", "shifted"):
            x = data(WINDOW, rng, shifted=device == "shifted")
            service.ingest.add_telemetry(device, wire(summarise(profile, x), seq=seq))
        service.ingest.flush()
    app = create_app(service, authenticate=service.authenticate)
    with TestClient(app) as client:
        assert client.get("/v1/drift").status_code == 401
        body = client.get("/v1/drift", headers=bearer(viewer)).json()
        mine = client.get("/v1/drift", params={"device": "shifted"}, headers=bearer(viewer))
        ghost = client.get("/v1/drift", params={"device": "ghost"}, headers=bearer(viewer))
        metrics = client.get("/metrics", headers=bearer(viewer)).text
    assert [(s["scope"], s["device_id"], s["severity"]) for s in body] == [
        ("fleet", None, "major"),
        ("device", "calm", "none"),
        ("device", "shifted", "major"),
    ]
    assert body[0]["devices"] == ["shifted", "calm"]
    assert {f["index"] for f in body[2]["top"][:4]} == set(range(D // 2))
    assert [s["device_id"] for s in mine.json()] == ["shifted"]
    assert ghost.status_code == 404
    assert f'fedge_drift_psi{{model="sensor",version="2"}} {body[0]["psi_max"]}' in metrics
    assert 'fedge_drift_devices{model="sensor",severity="major",version="2"} 1.0' in metrics


def test_a_device_gone_for_a_day_leaves_the_fleet_score(
    store: Store, profile: ReferenceProfile
) -> None:
    clock = ManualClock(5000.0)
    monitor = DriftMonitor(store, clock=clock)
    rng = np.random.default_rng(6)
    big = WINDOW * 4
    gone = wire(summarise(profile, data(big, rng, shifted=True)), seq=0).records[0]
    monitor.add_windows([("gone", gone)])
    clock.now += WINDOW_MAX_AGE_S + EXPIRE_EVERY_S
    here = wire(summarise(profile, data(big, rng)), seq=0).records[0]
    (device, fleet) = monitor.add_windows([("here", here)])
    assert device.device_id == "here"
    assert fleet.devices == ("here",)
    assert fleet.severity == "none"
    assert fleet.n == big


def test_the_service_pools_as_many_windows_as_its_config_says(
    store: Store, profile: ReferenceProfile
) -> None:
    settings = ServiceSettings(drift_windows=2)
    service = FleetService(store, MemoryHub(), None, settings=settings, clock=ManualClock(5000.0))
    rng = np.random.default_rng(7)
    for seq in range(3):
        service.ingest.add_telemetry("d", wire(summarise(profile, data(WINDOW, rng)), seq=seq))
        service.ingest.flush()
    (score,) = service.drift(device_id="d")
    assert (score.windows, score.n) == (2, 2 * WINDOW)
