"""What a restarted service hears before it resumes its rollouts (no broker needed).

With a persistent MQTT session the broker hands over what devices sent while the
service was down as soon as it connects, before the rollouts are resumed. The
manager takes its rollouts back (``load``) before connecting so those reports
count, except failures of the deployment the dead process sent (its transfer
died with it): the resumed deploy asks again.
"""

from __future__ import annotations

import time
from pathlib import Path

from compress.keys import generate_signing_key
from coordinator.delivery import Artifact, Coordinator, CoordinatorConfig
from coordinator.rollout_plan import Rollout, RolloutArtifact, RolloutState
from coordinator.rollout_policy import RolloutPolicy
from coordinator.rollouts import RolloutManager
from coordinator.store import MEMORY, Store
from edge_agent.config import BrokerConfig
from edge_agent.protocol import Envelope, InstallState, InstallStatus
from tests.fleet_support import make_artifact

DEVICES = ["d1", "d2", "d3", "d4"]


def report(manager: RolloutManager, device_id: str, deployment_id: str, state: str) -> None:
    status = InstallStatus(deployment_id=deployment_id, state=InstallState(state))
    manager.on_message(device_id, Envelope("a" * 32, device_id, time.time(), 1, status), 100)


def test_reports_queued_while_down_count_once_loaded_but_not_old_failures(
    tmp_path: Path,
) -> None:
    store = Store.open(MEMORY, artifact_dir=tmp_path / "artifacts")
    data = make_artifact(tmp_path, generate_signing_key(), version=2).read_bytes()
    manifest = Artifact.from_bytes(data).manifest
    sha = store.put_artifact(data, name=manifest.name, version=manifest.version, manifest={},
                             uploaded_by="test", at=1.0).sha256  # fmt: skip
    policy = RolloutPolicy.parse(canary="2", waves="100", soak="1h", max_failure="0%")
    now = time.time()
    engine = Rollout(rollout_id="ro-1", artifact=RolloutArtifact("digits", 2, sha), policy=policy,
                     devices=DEVICES, online=DEVICES, seed=1, now=now)  # fmt: skip
    engine.start(now)
    canary = engine.stage_devices(0)
    store.create_rollout("ro-1", artifact_sha256=sha, target="all", policy=policy.to_json(),
                         state=str(engine.state), snapshot=engine.snapshot(),
                         created_by="test", at=now)  # fmt: skip

    # Never connected: only what load() and the listener do is exercised.
    coordinator = Coordinator(CoordinatorConfig(broker=BrokerConfig("127.0.0.1", 1, False)))
    manager = RolloutManager(coordinator, store)
    report(manager, canary[0], "ro-1.old", "installed")  # before load: not ours yet
    assert manager.summary("ro-1") is None
    manager.load()
    manager.load()  # idempotent
    report(manager, canary[0], "ro-1.old", "failed")  # the dead process's transfer
    report(manager, canary[1], "ro-1.old", "installed")  # done while the service was down
    summary = manager.summary("ro-1")
    assert summary is not None
    assert summary["state"] == RolloutState.RUNNING
    states = {row.device_id: row.state for row in store.rollout_devices("ro-1")}
    assert states[canary[0]] == "pending"  # the old failure did not count
    assert states[canary[1]] == "installed"
    report(manager, canary[0], "ro-1.old", "installed")  # an installed report always counts
    states = {row.device_id: row.state for row in store.rollout_devices("ro-1")}
    assert states[canary[0]] == "installed"
    store.close()
