"""Retraining end to end with real agents over mosquitto (slow).

Four real agents (digits, Dirichlet shards) serve ``digits`` v1, an untrained
model deployed by the service. Drift in telemetry summaries makes the policy
start a federated run that the agents train; the finished run's candidate beats
the serving model on the held-out digits, is packaged with the service's
``[fleet]`` key (the one the agents trust), uploaded, and rolled out in stages
with the default health gate to the four agents, which end up serving v2.

Not shown: the drift is injected as telemetry summaries of shifted digits from
two reporting devices; the agents' own inputs are not shifted, and accuracy after
the rollout is measured on the held-out digits, not on post-shift data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from compress.families import forward, init_weights
from compress.profile import ReferenceProfile
from compress.signing import TrustedKeys
from coordinator.delivery.fleet_statement import StatementSettings
from coordinator.delivery.packaging import LabelledData, package_weights
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.monitoring.policy import Policy, RunSettings
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR, DeployRequest
from coordinator.service.retraining import ROLLING_OUT, TRAINING
from coordinator.service.store import RetrainingRow, Store
from coordinator.sim.datasets import load_digits_split
from edge_agent.protocol import (
    TelemetryBatch,
    WindowSummary,
)
from tests.drift_support import agent_summary, summary_batch
from tests.federated_support import FederatedFleet, device_ids, fleet_for_service
from tests.fleet_support import Mosquitto, wait_for

LAYERS = [64, 32, 10]
WINDOW = 300


@pytest.fixture
def broker_users() -> list[str]:
    return device_ids(4)


@pytest.fixture
def federated(tmp_path: Path, broker: Mosquitto) -> Iterator[FederatedFleet]:
    with fleet_for_service(broker, tmp_path, 4) as fleet:
        yield fleet


def summary(profile: ReferenceProfile, weights: dict[str, npt.NDArray[np.float32]],
            x: npt.NDArray[np.float32]) -> WindowSummary:  # fmt: skip
    return agent_summary(profile, x, forward("mlp", weights, x), classes=10)


def batch(window: WindowSummary, seq: int) -> TelemetryBatch:
    now = time.time()
    return summary_batch(window, seq=seq, model="digits", version=1, start=now - 10, end=now)


def serving_versions(service: FleetService) -> set[int | None]:
    """The versions of digits the four agents serve, as the store has them."""
    agents = set(device_ids(4))
    return {d.version for d in service.store.devices() if d.device_id in agents and
            d.model == "digits"} if all(d.model == "digits" for d in service.store.devices()
                                         if d.device_id in agents) else set()  # fmt: skip


@pytest.mark.slow
def test_drift_retrains_on_real_agents_and_packages_a_better_model(
    tmp_path: Path, federated: FederatedFleet
) -> None:
    key = federated.key
    assert key is not None
    x_train, y_train, x_test, y_test = load_digits_split(0)
    holdout = tmp_path / "holdout.npz"
    np.savez(holdout, x=x_test, y=y_test)
    serving_weights = init_weights("mlp", LAYERS, np.random.default_rng(5))  # untrained
    serving = package_weights(
        "mlp", serving_weights, name="digits", version=1, keys=[key],
        out=tmp_path / "digits-v1.fedge", evaluation=LabelledData(x_train, y_train),
        now=datetime.now(UTC),
    )  # fmt: skip
    hub = MqttHub(HubConfig(broker=federated.broker.broker("coordinator")))
    settings = ServiceSettings(fleet=StatementSettings("f1", (key,)), retraining_every_s=0.2)
    service = FleetService(Store.open(tmp_path / "state.db"), hub,
                           TrustedKeys.of([key.public_key]), settings=settings)  # fmt: skip
    service.start()
    try:
        v1 = service.upload_artifact(serving.path.read_bytes(), actor=CLI_ACTOR)
        wait_for(lambda: sum(r.can_train for r in service.hub.fleet()) == 4)
        deployed = service.deploy(DeployRequest(v1.sha256, timeout_s=60.0), actor=CLI_ACTOR)
        deployment = deployed.result.deployment_id
        wait_for(lambda: service.deployment(deployment).done, timeout=90.0, what="v1 deployed")
        wait_for(lambda: serving_versions(service) == {1}, what="the agents serving v1")
        train = {"epochs": 2, "lr": 0.05, "batch_size": 16}
        run = RunSettings(rounds=3, clients=4, min_clients=3, round_timeout_s=60.0,
                          config={"features": 64, "classes": 10, "hidden": [32],
                                  "train": train})  # fmt: skip
        service.set_policy(Policy("digits", drift_psi=0.25, windows=2, holdout=str(holdout),
                                  soak_s=2.0, run=run), actor=CLI_ACTOR)  # fmt: skip
        profile = serving.manifest.reference
        assert profile is not None
        rng = np.random.default_rng(1)
        # The sensors' gain and offset change from the 3rd window on; windows keep
        # coming (every 0.5 s here) until the policy acts: a fleet score is stored at
        # each change of severity, else every 30 s, and the policy wants two in a row.
        for seq in range(200):
            for device in ("sensor-a", "sensor-b"):
                x = x_test[rng.integers(0, len(x_test), WINDOW)]
                if seq >= 2:
                    x = np.asarray(1.5 * x + 0.5, dtype=np.float32)
                service.ingest.add_telemetry(device, batch(summary(profile, serving_weights, x),
                                                           seq))  # fmt: skip
            service.ingest.flush()
            time.sleep(0.5)
            if service.retrainings():
                break
        scores = service.store.drift_history(model="digits", version=1)
        assert scores, "no fleet drift score"
        assert scores[0].severity == "major", scores[0]
        [started] = wait_for(service.retrainings, what="a retraining run")
        assert started.state == TRAINING
        assert started.trigger["kind"] == "drift"
        assert started.trigger["value"] >= 0.25
        assert service.store.run(started.run_id).created_by == "policy:digits"

        def delivered() -> RetrainingRow | None:
            row = service.store.retraining(started.run_id)
            return None if row.state == TRAINING else row

        row = wait_for(delivered, timeout=240.0, what="the run to be delivered")
        assert row.state == ROLLING_OUT, row.detail
        assert row.detail["candidate_metric"] > row.detail["serving_metric"] + 0.3
        rollout_id = row.detail["rollout_id"]
        wait_for(lambda: service.rollout(rollout_id).rollout.state == "completed",
                 timeout=240.0, what="the rollout to complete")  # fmt: skip
        wait_for(lambda: serving_versions(service) == {2}, what="the agents serving v2")
        assert service.rollout(rollout_id).rollout.target == "device:" + ",".join(device_ids(4))
        artifact = service.store.artifact(row.detail["artifact"])
        assert artifact is not None
        assert artifact.version == 2
        assert artifact.manifest["metadata"]["run_id"] == started.run_id
        view = service.run(started.run_id)
        assert [r.status for r in view.rounds] == ["ok", "ok", "ok"]
        actions = [a.action for a in service.audit_log(limit=1000)]
        for step in ("policy.set", "retraining.start", "artifact.upload", "rollout.create",
                     "retraining.rolling_out"):  # fmt: skip
            assert step in actions
    finally:
        service.stop()
        service.store.close()
