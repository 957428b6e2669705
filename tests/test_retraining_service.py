"""Retraining policies in the service: set through the service and the HTTP API,
evaluated against the drift the service computes from telemetry summaries, and a
federated run started on a trigger (in-memory store and hub, no broker).

What is shown: telemetry windows of three devices go through ingest and the drift
monitor; with no shift, ticks of the retraining loop start nothing (false alarms:
0); once two of the devices' inputs shift, the fleet's stored drift scores cross the
policy's threshold, and after ``windows`` consecutive scores above it the loop
starts a run through the service's RunManager (``fedge runs`` shows it, created by
``policy:sensor``), records its trigger and audits it. With no device to train, the
run fails; the next tick records that (``failed``) and the cooldown keeps a second
run from starting. Evaluation, packaging and rollout are not done by this slice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from compress.keys import SigningKey
from compress.lineage import Lineage
from compress.profile import ReferenceProfile
from compress.signing import TrustedKeys
from coordinator.delivery.fleet_statement import StatementSettings
from coordinator.delivery.packaging import checked_labelled, package_weights
from coordinator.errors import NotFoundError, PolicyError
from coordinator.federated.reports import RunResult
from coordinator.link.memory import MemoryHub
from coordinator.monitoring.policy import Policy, RunSettings
from coordinator.service.api import create_app
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR
from coordinator.service.retraining import (
    AWAITING_APPROVAL,
    FAILED,
    REJECTED,
    ROLLING_OUT,
    TRAINED,
    TRAINING,
)
from coordinator.service.store import MEMORY, RunState, Store
from coordinator.service.tokens import Role
from edge_agent.protocol import ModelInfo, Status
from tests.api_support import TestClient, bearer
from tests.clock_support import ManualClock
from tests.fleet_support import wait_for
from tests.test_drift_service import (
    WINDOW,
    data,
    model,
    sensor_profile,
    sensor_store,
    summarise,
    wire,
)

RUN = RunSettings(rounds=1, clients=2, min_clients=1, round_timeout_s=0.5,
                  config={"features": 8, "classes": 3})  # fmt: skip
POLICY = Policy("sensor", drift_psi=0.25, windows=2, cooldown_s=3600.0, run=RUN)


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return sensor_profile()


@pytest.fixture
def store(tmp_path: Path, profile: ReferenceProfile) -> Iterator[Store]:
    with sensor_store(tmp_path, profile) as store:
        yield store


def make_service(store: Store, clock: ManualClock, key: SigningKey | None) -> FleetService:
    fleet = None if key is None else StatementSettings("f1", (key,))
    return FleetService(store, MemoryHub(), None, settings=ServiceSettings(fleet=fleet),
                        clock=clock)  # fmt: skip


def feed(service: FleetService, profile: ReferenceProfile, clock: ManualClock, seq: int, *,
         shifted: bool, rng: np.random.Generator) -> None:  # fmt: skip
    """One telemetry window from each of three devices; two of them shifted if asked."""
    for device in ("control", "drifting-1", "drifting-2"):
        x = data(WINDOW * 3, rng, shifted=shifted and device != "control")
        service.ingest.add_telemetry(device, wire(summarise(profile, x), seq=seq))
    service.ingest.flush()
    clock.now += 35.0  # past the 30 s between stored fleet scores


def test_a_policy_is_refused_when_the_service_cannot_sign(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(store, ManualClock(5000.0), None)
    with caplog.at_level(logging.WARNING), pytest.raises(PolicyError, match=r"no key to sign"):
        service.set_policy(POLICY, actor=CLI_ACTOR)
    assert "policy sensor refused: no signing key" in caplog.text
    assert service.policies() == []
    assert store.audit_log() == []


def test_set_show_list_delete_are_stored_and_audited(
    store: Store, signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(store, ManualClock(5000.0), signing_key)
    row = service.set_policy(POLICY, actor=CLI_ACTOR)
    assert row.policy == POLICY
    assert service.policy("sensor").policy == POLICY
    replaced = Policy("sensor", drift_severity="major", require_approval=True, run=RUN)
    service.set_policy(replaced, actor=CLI_ACTOR)
    assert [r.policy for r in service.policies()] == [replaced]
    bad_run = Policy("other", drift_psi=0.2, run=RunSettings(strategy="no-such-strategy"))
    with caplog.at_level(logging.WARNING), pytest.raises(PolicyError, match="run is invalid"):
        service.set_policy(bad_run, actor=CLI_ACTOR)
    assert "policy other refused" in caplog.text
    assert service.delete_policy("sensor", actor=CLI_ACTOR).policy == replaced
    with pytest.raises(NotFoundError):
        service.policy("sensor")
    actions = [(a.action, a.target) for a in store.audit_log()]
    assert actions == [("policy.set", "sensor"), ("policy.set", "sensor"),
                       ("policy.delete", "sensor")]  # fmt: skip


def test_the_http_api_sets_and_lists_policies_for_operators_only(
    store: Store, signing_key: SigningKey
) -> None:
    clock = ManualClock(5000.0)
    service = make_service(store, clock, signing_key)
    _r, viewer = store.add_token("dashboard", Role.VIEWER, clock.now)
    _r, operator = store.add_token("ops", Role.OPERATOR, clock.now)
    body = {"drift_psi": 0.3, "windows": 4, "run": {"rounds": 2, "clients": 3,
            "config": {"features": 8, "classes": 3}}}  # fmt: skip
    with TestClient(create_app(service, authenticate=service.authenticate)) as client:
        refused = client.post("/v1/policies/sensor", json=body, headers=bearer(viewer))
        assert refused.status_code == 403
        answer = client.post("/v1/policies/sensor", json=body, headers=bearer(operator))
        assert answer.status_code == 200, answer.text
        assert answer.json()["policy"]["windows"] == 4
        invalid = client.post("/v1/policies/sensor", json={"windows": 2},
                              headers=bearer(operator))  # fmt: skip
        assert invalid.status_code == 400
        assert invalid.json()["error"]["code"] == "policy_error"
        listed = client.get("/v1/policies", headers=bearer(viewer)).json()
        assert [p["policy"]["name"] for p in listed] == ["sensor"]
        assert client.get("/v1/policies/ghost", headers=bearer(viewer)).status_code == 404
        for hostile in (
            {"drift_psi": float("nan")},
            {"drift_psi": float("inf")},
            {"drift_psi": 0.3, "windows": -1},
            {"drift_psi": 0.3, "run": {"config": {"clients_per_round": 10**6}}},
            {"drift_psi": 0.3, "run": {"rounds": 10**9}},
        ):
            headers = {**bearer(operator), "Content-Type": "application/json"}
            answer = client.post("/v1/policies/sensor", content=json.dumps(hostile),
                                 headers=headers)  # fmt: skip
            assert answer.status_code in (400, 422), (hostile, answer.text)
        assert client.post("/v1/policies/bad%07name", json=body,
                           headers=bearer(operator)).status_code == 400  # fmt: skip
        assert service.policy("sensor").policy.windows == 4  # unchanged by the refusals
        deleted = client.post("/v1/policies/sensor/delete", headers=bearer(operator))
        assert deleted.status_code == 200
        assert client.get("/v1/retrainings", headers=bearer(viewer)).json() == []
    assert service.policies() == []


def test_drift_starts_a_run_once_then_the_cooldown_holds(
    store: Store, profile: ReferenceProfile, signing_key: SigningKey
) -> None:
    clock = ManualClock(5000.0)
    service = make_service(store, clock, signing_key)
    service.set_policy(POLICY, actor=CLI_ACTOR)
    rng = np.random.default_rng(7)
    for seq in range(5):  # control: no shift, the loop starts nothing
        feed(service, profile, clock, seq, shifted=False, rng=rng)
        assert service.retraining.tick() == []
    assert store.runs() == []
    started = []
    for seq in range(5, 20):
        feed(service, profile, clock, seq, shifted=True, rng=rng)
        started += service.retraining.tick()
        if started:
            break
    assert len(started) == 1, "no run started on the drift"
    row = started[0]
    assert row.state == TRAINING
    assert row.trigger["policy"] == "sensor"
    assert row.trigger["kind"] == "drift"
    assert row.trigger["value"] >= 0.25
    assert row.trigger["version"] == 2
    assert set(row.trigger["devices"][:2]) == {"drifting-1", "drifting-2"}
    run = store.run(row.run_id)
    assert run is not None
    assert run.created_by == "policy:sensor"
    assert run.config["clients_per_round"] == 2
    assert run.config["model"] == "sensor"
    start = [a for a in store.audit_log() if a.action == "retraining.start"]
    assert [a.target for a in start] == [row.run_id]
    assert start[0].actor == "policy:sensor"
    assert start[0].detail["trigger"]["value"] == row.trigger["value"]
    # No device trains: the run fails; the next tick records it, and the cooldown
    # keeps the drift, still above the threshold, from starting another.
    deadline = time.monotonic() + 30
    while (current := store.run(row.run_id)) is not None and current.state == RunState.RUNNING:
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.05)
    feed(service, profile, clock, 20, shifted=True, rng=rng)
    moved = service.retraining.tick()
    assert [(m.run_id, m.state) for m in moved] == [(row.run_id, FAILED)]
    assert service.retraining.decision(POLICY).reason.startswith("cooling down")
    assert [r.run_id for r in service.retrainings()] == [row.run_id]
    assert [a.action for a in store.audit_log()][-1] == "retraining.failed"
    service.stop()


# --------------------------------------------------------------- candidate delivery

HOLDOUT_ROWS = 600
WEIGHTS_OF_TRUTH = np.asarray(model(np.eye(8, dtype=np.float32)), dtype=np.float32)
"""The linear model that labels the data (x @ W): a softmax model of it is exact."""
WEAK = WEIGHTS_OF_TRUTH + np.random.default_rng(12).normal(scale=2.0, size=WEIGHTS_OF_TRUTH.shape)
"""The serving model: the truth, badly estimated."""


def softmax_weights(w: np.ndarray) -> dict[str, np.ndarray]:
    return {"W0": np.asarray(w, dtype=np.float32), "b0": np.zeros(w.shape[1], np.float32)}


@pytest.fixture
def delivery(
    tmp_path: Path, profile: ReferenceProfile, signing_key: SigningKey
) -> Iterator[tuple[FleetService, Store, Path]]:
    """A service whose fleet key signs and is trusted; sensor v2 (a weak model) serving
    two devices; held-out data labelled by the true model."""
    rng = np.random.default_rng(11)
    x = data(HOLDOUT_ROWS, rng)
    holdout = tmp_path / "holdout.npz"
    np.savez(holdout, x=x, y=model(x).argmax(axis=1))
    weak = WEAK
    serving = package_weights(
        "softmax", softmax_weights(weak), name="sensor", version=2, keys=[signing_key],
        out=tmp_path / "sensor-v2.fedge", evaluation=checked_labelled(x, model(x).argmax(1),
        "classification"), now=datetime.now(UTC),
    )  # fmt: skip
    with Store.open(MEMORY, artifact_dir=tmp_path / "artifacts") as store:
        clock = ManualClock(5000.0)
        clock.now = time.time()  # packaging dates the manifest, uploads check its expiry
        hub = MemoryHub()
        service = FleetService(
            store, hub, TrustedKeys.of([signing_key.public_key]),
            settings=ServiceSettings(fleet=StatementSettings("f1", (signing_key,))), clock=clock,
        )  # fmt: skip
        row = service.upload_artifact(serving.path.read_bytes(), actor=CLI_ACTOR)
        service.start()
        for device in ("pi-1", "pi-2"):  # both serve sensor v2
            installed = ModelInfo(name="sensor", version=2, sha256=row.sha256)
            hub.receive(device, Status(online=True, agent_version="1", models=(installed,)))
        wait_for(lambda: all(d.model == "sensor" for d in store.devices()) and
                 len(store.devices()) == 2)  # fmt: skip
        try:
            yield service, store, holdout
        finally:
            service.stop()


def finished_run(service: FleetService, store: Store, weights: np.ndarray, run_id: str) -> None:
    """A run the policy started, finished with ``weights`` (no devices train here)."""
    store.create_run(run_id, config={}, created_by="policy:sensor", at=1.0)
    store.add_retraining(run_id, policy="sensor", state=TRAINING,
                         trigger={"policy": "sensor", "kind": "drift", "version": 2,
                                  "value": 0.4}, at=1.0)  # fmt: skip
    store.finish_run(run_id, state=RunState.FINISHED, at=2.0)

    class Config:
        family = "softmax"

    service.retraining.run_finished(run_id, RunState.FINISHED,
                                    RunResult(rounds=[], weights=softmax_weights(weights)),
                                    Config())  # type: ignore[arg-type]  # fmt: skip


def test_a_better_candidate_is_packaged_uploaded_and_rolled_out(
    delivery: tuple[FleetService, Store, Path],
) -> None:
    service, store, holdout = delivery
    service.set_policy(Policy("sensor", drift_psi=0.25, holdout=str(holdout), run=RUN),
                       actor=CLI_ACTOR)  # fmt: skip
    finished_run(service, store, WEIGHTS_OF_TRUTH, "run-good")
    [row] = service.retraining.tick()
    assert row.state == ROLLING_OUT, row.detail
    assert row.detail["candidate_metric"] > row.detail["serving_metric"]
    new = store.artifact(row.detail["artifact"])
    assert new is not None
    assert new.version == 3
    assert new.uploaded_by == "policy:sensor"
    assert new.manifest["metadata"]["run_id"] == "run-good"
    assert '"value":0.4' in new.manifest["metadata"]["trigger"]
    lineage = Lineage.from_dict(new.manifest["lineage"])
    assert lineage.trigger.kind == "policy"
    assert (lineage.trigger.policy, lineage.trigger.drift) == ("sensor", 0.4)
    assert lineage.run_id == "run-good"
    assert (lineage.strategy, lineage.codec) == (RUN.strategy, RUN.codec)
    serving = next(a for a in store.artifacts() if a.version == 2)
    assert lineage.parent is not None
    assert (lineage.parent.name, lineage.parent.version) == ("sensor", 2)
    assert lineage.parent.sha256 == serving.manifest["sha256"]
    [rollout] = service.rollouts()
    assert rollout.rollout_id == row.detail["rollout_id"]
    assert rollout.target == "device:pi-1,pi-2"
    actions = [(a.action, a.actor) for a in store.audit_log()]
    assert ("artifact.upload", "policy:sensor") in actions
    assert ("rollout.create", "policy:sensor") in actions
    assert actions[-1] == ("retraining.rolling_out", "policy:sensor")


def test_a_candidate_not_better_is_rejected_and_nothing_is_signed(
    delivery: tuple[FleetService, Store, Path],
) -> None:
    service, store, holdout = delivery
    service.set_policy(Policy("sensor", drift_psi=0.25, holdout=str(holdout), run=RUN),
                       actor=CLI_ACTOR)  # fmt: skip
    finished_run(service, store, -WEIGHTS_OF_TRUTH, "run-bad")  # picks the least likely class
    [row] = service.retraining.tick()
    assert row.state == REJECTED
    assert "worse than the deployed one" in row.detail["reason"]
    assert [a.version for a in store.artifacts()] == [2]
    assert service.rollouts() == []


def test_approval_holds_the_rollout_until_an_operator_approves(
    delivery: tuple[FleetService, Store, Path],
) -> None:
    service, store, holdout = delivery
    policy = Policy("sensor", drift_psi=0.25, holdout=str(holdout), require_approval=True,
                    run=RUN)  # fmt: skip
    service.set_policy(policy, actor=CLI_ACTOR)
    finished_run(service, store, WEIGHTS_OF_TRUTH, "run-held")
    [row] = service.retraining.tick()
    assert row.state == AWAITING_APPROVAL
    assert service.rollouts() == []
    approved = service.approve_retraining("run-held", actor=CLI_ACTOR)
    assert approved.state == ROLLING_OUT
    assert [r.rollout_id for r in service.rollouts()] == [approved.detail["rollout_id"]]
    with pytest.raises(PolicyError, match="not awaiting approval"):
        service.approve_retraining("run-held", actor=CLI_ACTOR)
    assert ("retraining.approve", CLI_ACTOR.name) in [
        (a.action, a.actor) for a in store.audit_log()
    ]


def test_without_holdout_data_a_candidate_is_not_delivered(
    delivery: tuple[FleetService, Store, Path],
) -> None:
    service, store, _holdout = delivery
    service.set_policy(POLICY, actor=CLI_ACTOR)
    finished_run(service, store, WEIGHTS_OF_TRUTH, "run-blind")
    [row] = service.retraining.tick()
    assert row.state == TRAINED
    assert "no holdout data" in row.detail["next"]
    assert service.rollouts() == []


def test_a_candidate_only_as_good_as_the_serving_model_is_rejected(
    delivery: tuple[FleetService, Store, Path],
) -> None:
    service, store, holdout = delivery
    service.set_policy(Policy("sensor", drift_psi=0.25, holdout=str(holdout), run=RUN),
                       actor=CLI_ACTOR)  # fmt: skip
    finished_run(service, store, WEAK, "run-same")  # the serving model's own weights
    [row] = service.retraining.tick()
    assert row.state == REJECTED
    assert "not better than the serving one" in row.detail["reason"]
    assert [a.version for a in store.artifacts()] == [2]


def test_two_automatic_retrainings_chain_their_lineage(
    delivery: tuple[FleetService, Store, Path],
) -> None:
    """v2 (serving) -> v3 (first retraining) -> v4 (second): each retrained model names
    its policy trigger, its run, and the model it replaced as its parent."""
    service, store, holdout = delivery
    service.set_policy(Policy("sensor", drift_psi=0.25, holdout=str(holdout), run=RUN),
                       actor=CLI_ACTOR)  # fmt: skip
    halfway = (WEAK + WEIGHTS_OF_TRUTH) / 2
    finished_run(service, store, halfway, "run-one")
    [first] = service.retraining.tick()
    assert first.state == ROLLING_OUT, first.detail
    v3 = store.artifact(first.detail["artifact"])
    assert v3 is not None
    assert v3.version == 3
    # The next retraining compares with (and replaces) what now serves: v3.
    store.add_retraining("run-two", policy="sensor", state=TRAINING,
                         trigger={"policy": "sensor", "kind": "drift", "version": 3,
                                  "value": 0.3}, at=3.0)  # fmt: skip
    store.create_run("run-two", config={}, created_by="policy:sensor", at=3.0)
    store.finish_run("run-two", state=RunState.FINISHED, at=4.0)

    class Config:
        family = "softmax"

    service.retraining.run_finished("run-two", RunState.FINISHED,
                                    RunResult(rounds=[], weights=softmax_weights(WEIGHTS_OF_TRUTH)),
                                    Config())  # type: ignore[arg-type]  # fmt: skip
    [second] = service.retraining.tick()
    assert second.state == ROLLING_OUT, second.detail
    v4 = store.artifact(second.detail["artifact"])
    assert v4 is not None
    assert v4.version == 4
    chain = [Lineage.from_dict(a.manifest["lineage"]) for a in (v4, v3)]
    assert [lin.run_id for lin in chain] == ["run-two", "run-one"]
    assert [lin.trigger.drift for lin in chain] == [0.3, 0.4]
    assert all(lin.trigger.kind == "policy" for lin in chain)
    parents = [lin.parent for lin in chain]
    assert all(p is not None for p in parents)
    assert [(p.version, p.sha256) for p in parents if p is not None] == [
        (3, v3.manifest["sha256"]),
        (2, next(a for a in store.artifacts() if a.version == 2).manifest["sha256"]),
    ]
