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
from coordinator.delivery.deliveries import Artifact
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.rollout.actions import RolloutState
from coordinator.rollout.devices import RolloutArtifact
from coordinator.rollout.engine import Rollout
from coordinator.rollout.manager import RolloutManager
from coordinator.rollout.policy import RolloutPolicy
from coordinator.service.store import MEMORY, Store
from edge_agent.config.agent import BrokerConfig
from edge_agent.protocol import (
    Envelope,
    Histogram,
    InstallState,
    InstallStatus,
    LatencyQuantiles,
    TelemetryBatch,
    TelemetryRecord,
)
from tests.fleet_support import make_artifact

DEVICES = ["d1", "d2", "d3", "d4"]


def report(manager: RolloutManager, device_id: str, deployment_id: str, state: str) -> None:
    status = InstallStatus(deployment_id=deployment_id, state=InstallState(state))
    manager.on_message(device_id, Envelope("a" * 32, device_id, time.time(), 1, status), 100)


def stored(tmp_path: Path) -> tuple[Store, tuple[str, ...]]:
    """A store holding rollout ``ro-1`` of digits v2 to DEVICES, its canary released."""
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
    store.create_rollout("ro-1", artifact_sha256=sha, target="all", policy=policy.to_json(),
                         state=str(engine.state), snapshot=engine.snapshot(),
                         created_by="test", at=now)  # fmt: skip
    return store, engine.stage_devices(0)


def never_connected(store: Store) -> RolloutManager:
    """A manager whose coordinator never connects: only load() and the listener run."""
    hub = MqttHub(HubConfig(broker=BrokerConfig("127.0.0.1", 1, False)))
    return RolloutManager(hub, store)


def loaded(tmp_path: Path) -> tuple[Store, RolloutManager, tuple[str, ...]]:
    store, canary = stored(tmp_path)
    manager = never_connected(store)
    manager.load()
    return store, manager, canary


def test_reports_queued_while_down_count_once_loaded_but_not_old_failures(
    tmp_path: Path,
) -> None:
    store, canary = stored(tmp_path)
    manager = never_connected(store)
    report(manager, canary[0], "ro-1.old", "installed")  # before load: not ours yet
    assert manager.summary("ro-1") is None
    manager.load()
    manager.load()  # idempotent
    report(manager, canary[0], "ro-1.old", "failed")  # the dead process's transfer
    report(manager, canary[1], "ro-1.old", "installed")  # done while the service was down
    summary = manager.summary("ro-1")
    assert summary is not None
    assert summary["state"] == RolloutState.RUNNING
    states = {row.device_id: row.state for row in manager.devices("ro-1") or ()}
    assert states[canary[0]] == "pending"  # the old failure did not count
    assert states[canary[1]] == "installed"
    report(manager, canary[0], "ro-1.old", "installed")  # an installed report always counts
    manager.stop()  # saves what the tick thread would have saved
    states = {row.device_id: row.state for row in store.rollout_devices("ro-1")}
    assert (states[canary[0]], states[canary[1]]) == ("installed", "installed")
    store.close()


def test_device_progress_is_saved_by_the_tick_not_on_the_network_thread(
    tmp_path: Path,
) -> None:
    store, manager, canary = loaded(tmp_path)
    saved = store.rollout("ro-1")
    assert saved is not None
    window = TelemetryRecord(
        window_start=1.0, window_end=2.0, model="digits", version=1, predictions=50, errors=0,
        latency_ms=LatencyQuantiles(1.0, 2.0, 3.0), histogram=Histogram((1.0,), (50, 0)),
        cpu_percent=1.0, memory_bytes=1, uptime_s=1.0,
    )  # fmt: skip
    batch = TelemetryBatch(seq=1, records=(window,))
    manager.on_message(canary[0], Envelope("b" * 32, canary[0], time.time(), 1, batch), 100)
    report(manager, canary[1], "ro-1.old", "installed")  # a device's progress, likewise
    again = store.rollout("ro-1")
    assert again is not None
    assert again.updated_at == saved.updated_at  # not saved by the events themselves
    live = {row.device_id: row.state for row in manager.devices("ro-1") or ()}
    assert live[canary[1]] == "installed"  # what the API shows meanwhile
    manager.stop()  # what a tick would do: the baseline and the progress are saved
    stored = store.rollout("ro-1")
    assert stored is not None
    (device,) = [d for d in stored.snapshot["devices"] if d["device_id"] == canary[0]]
    assert [w["p95_ms"] for w in device["baseline_windows"]] == [2.0]
    assert {r.device_id: r.state for r in store.rollout_devices("ro-1")}[canary[1]] == "installed"
    store.close()
