"""The coordinator service end to end: FleetService, a real mosquitto, 20 agents.

The agents run in this process on one shared network loop (as in ``fedge
simulate``); the service keeps its state in a SQLite file in the test's directory.
Everything goes through the :class:`~coordinator.service.operations.Operations` methods the
HTTP API and the CLI call.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest

from compress.keys import SigningKey, generate_signing_key
from coordinator.errors import ArtifactRejectedError, NotFoundError, RolloutError
from coordinator.rollout.actions import RolloutState
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import (
    CLI_ACTOR,
    Actor,
    DeploymentView,
    DeployRequest,
    RollbackRequest,
    RolloutRequest,
)
from edge_agent.agent import Agent
from edge_agent.errors import AgentError
from tests import service_support
from tests.fleet_support import (
    ACCEPT_WAIT_S,
    FEATURES,
    InProcessFleet,
    Mosquitto,
    make_artifact,
    wait_for,
)
from tests.service_support import running_service

pytestmark = pytest.mark.slow

DEVICES = [f"sv{i:02d}" for i in range(20)]
OPERATOR = Actor("ab12cd34ef56", CLI_ACTOR.role)


@pytest.fixture
def broker_users() -> list[str]:
    return DEVICES


def open_service(
    tmp_path: Path, broker: Mosquitto, signing_key: SigningKey, *, session: str | None = None
) -> FleetService:
    settings = ServiceSettings(
        telemetry_flush_s=0.2, rollout_tick_s=0.2, accept_wait_s=ACCEPT_WAIT_S
    )
    return service_support.open_service(tmp_path, broker, signing_key, settings, session=session)


@pytest.fixture
def service(tmp_path: Path, broker: Mosquitto, signing_key: SigningKey) -> Iterator[FleetService]:
    settings = ServiceSettings(
        telemetry_flush_s=0.2, rollout_tick_s=0.2, accept_wait_s=ACCEPT_WAIT_S
    )
    with running_service(tmp_path, broker, signing_key, settings) as instance:
        yield instance


def online(service: FleetService) -> int:
    return sum(r.online for r in service.hub.fleet())


def served(service: FleetService) -> dict[str, int | None]:
    """The version of ``digits`` each device serves, as its status says."""
    return {
        r.device_id: max((m.version for m in r.models if m.name == "digits"), default=None)
        for r in service.hub.fleet()
    }


def state(service: FleetService, rollout_id: str) -> str:
    return service.rollout(rollout_id).rollout.state


def upload(service: FleetService, path: Path) -> str:
    return service.upload_artifact(path.read_bytes(), actor=OPERATOR).sha256


def everywhere(service: FleetService, artifact: Path, devices: int) -> None:
    """Upload an artifact and roll it out to every device at once, to completion."""
    sha = upload(service, artifact)
    request = RolloutRequest(artifact_sha256=sha, canary=str(devices), soak="0s")
    rollout_id = service.create_rollout(request, actor=OPERATOR).rollout.rollout_id
    wait_for(lambda: state(service, rollout_id) == RolloutState.COMPLETED, what="everywhere")


def test_a_rollout_to_20_agents_in_a_canary_of_2_then_waves_50_100_completes(
    tmp_path: Path, signing_key: SigningKey, fleet: InProcessFleet, service: FleetService
) -> None:
    for device in DEVICES:
        fleet.start(device)
    wait_for(lambda: online(service) == 20, what="20 agents online")
    sha = upload(service, make_artifact(tmp_path, signing_key, version=2))
    request = RolloutRequest(artifact_sha256=sha, target="all", canary="2", waves="50,100",
                             soak="1s", max_failure="10%")  # fmt: skip
    view = service.create_rollout(request, actor=OPERATOR)
    rollout_id = view.rollout.rollout_id
    assert view.summary["stages"] == 3
    wait_for(lambda: state(service, rollout_id) == RolloutState.COMPLETED, what="completed")

    assert set(served(service).values()) == {2}
    view = service.rollout(rollout_id)
    sizes = [sum(d.stage == s for d in view.devices) for s in range(3)]
    assert sizes == [2, 8, 10]  # canary 2, then up to 50 % (10), then 100 % (20)
    assert {d.state for d in view.devices} == {"installed"}
    # A long-running service keeps no delivery once every device installed.
    wait_for(lambda: service.deliveries.tracked() == [], what="deliveries forgotten")
    # The stored inventory and telemetry follow the fleet.
    wait_for(lambda: {d.version for d in service.devices()} == {2}, what="inventory")
    assert sorted(d.device_id for d in service.devices()) == DEVICES
    assert all(d.online for d in service.devices())
    wait_for(lambda: all(service.telemetry(d, limit=1) for d in DEVICES), what="telemetry")
    figures = service.metrics()
    assert figures.devices_online == 20
    assert figures.models == {("digits", 2): 20}
    assert figures.rollouts == {"completed": 1}
    assert figures.rollout_stages == figures.rollout_devices == {}  # only those going
    actions = [(a.actor, a.action, a.target) for a in service.audit_log()]
    assert actions == [
        (OPERATOR.name, "artifact.upload", sha),
        (OPERATOR.name, "rollout.create", rollout_id),
    ]
    # Every telemetry window the broker took from the agents ends up in the store.
    sent = fleet.stop_agents()
    assert sent >= 20
    wait_for(lambda: service.ingest.counts().stored == sent, what="all telemetry stored")
    assert service.store.telemetry_count() == sent
    wait_for(lambda: not any(d.online for d in service.devices()), what="Last Wills stored")
    for device in DEVICES:  # first sight online, then the clean stop's offline
        assert [p.online for p in service.presence(device)] == [False, True]


def finished(service: FleetService, deployment_id: str) -> DeploymentView:
    """The view of a one-shot deployment once it is done."""
    view: DeploymentView = wait_for(
        lambda: (v := service.deployment(deployment_id)).done and v, what=f"{deployment_id} done"
    )
    return view


def test_one_shot_deploy_and_rollback_through_the_service(
    tmp_path: Path, signing_key: SigningKey, fleet: InProcessFleet, service: FleetService
) -> None:
    for device in DEVICES[:3]:
        fleet.start(device)
    wait_for(lambda: online(service) == 3, what="3 agents online")
    with pytest.raises(NotFoundError, match="upload it first"):
        service.deploy(DeployRequest("ab" * 32), actor=OPERATOR)
    for version in (1, 2):
        sha = upload(service, make_artifact(tmp_path, signing_key, version=version))
        started = service.deploy(DeployRequest(sha, timeout_s=30), actor=OPERATOR)
        deployment_id = started.result.deployment_id
        view = finished(service, deployment_id)
        assert view.result.succeeded, view.result.to_json()
        assert view.delivered
    assert set(served(service).values()) == {2}

    target = f"device:{DEVICES[0]}"
    started = service.rollback(RollbackRequest("digits", target=target), actor=OPERATOR)
    rollback_id = started.result.deployment_id
    view = finished(service, rollback_id)
    assert [p.state for p in view.result.devices] == ["rolled_back"]
    wait_for(lambda: served(service)[DEVICES[0]] == 1, what="the previous model back")
    actions = [(a.action, a.target) for a in service.audit_log() if "create" in a.action]
    assert actions == [
        ("deployment.create", ANY),
        ("deployment.create", deployment_id),
        ("rollback.create", rollback_id),
    ]
    with pytest.raises(NotFoundError, match="no deployment"):
        service.deployment("nope")


def test_an_artifact_failing_its_health_check_halts_after_the_canary_and_rolls_it_back(
    tmp_path: Path, signing_key: SigningKey, fleet: InProcessFleet, service: FleetService
) -> None:
    for device in DEVICES:
        fleet.start(device)
    wait_for(lambda: online(service) == 20, what="20 agents online")
    everywhere(service, make_artifact(tmp_path, signing_key, version=2), len(DEVICES))

    bad = upload(service, make_artifact(tmp_path, signing_key, version=3, break_health_check=True))
    request = RolloutRequest(artifact_sha256=bad, canary="2", waves="50,100", soak="1s",
                             max_failure="10%")  # fmt: skip
    second = service.create_rollout(request, actor=OPERATOR).rollout.rollout_id
    wait_for(lambda: state(service, second) == RolloutState.HALTED, what="halted")
    # That a halted rollout releases nothing more, however long it waits, is the
    # engine's (test_rollout_plan, fake clock); here: the canary's revert settles it.

    def canary_rolled_back() -> bool:
        devices = service.rollout(second).devices
        return {d.state for d in devices if d.stage == 0} == {"rolled_back"}

    wait_for(canary_rolled_back, what="the canary rolled back")
    # The halted rollout settled and the completed one has every device installed:
    # the coordinator keeps none of their deliveries.
    wait_for(lambda: service.deliveries.tracked() == [], what="no delivery tracked")
    view = service.rollout(second)
    canary = [d for d in view.devices if d.stage == 0]
    assert len(canary) == 2
    assert {d.state for d in view.devices if d.stage > 0} == {"waiting"}
    assert set(served(service).values()) == {2}
    assert view.summary["halt_reason"]
    with pytest.raises(RolloutError):
        service.resume_rollout(second, actor=OPERATOR)


class Traffic:
    """Inference calls on agents, one after another from one thread, until closed."""

    def __init__(self, agents: Sequence[Agent]) -> None:
        self.calls = 0
        self.refused = 0  # calls while an agent is between two models
        self._agents = agents
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        inputs = np.random.default_rng(0).random((1, FEATURES), dtype=np.float32)
        while not self._done.wait(0.002):
            for agent in self._agents:
                try:
                    agent.predict(inputs)
                    self.calls += 1
                except AgentError:
                    self.refused += 1  # between models while installing; not judged here

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=10.0)


def test_a_model_slower_than_the_one_before_halts_after_the_canary_and_is_rolled_back(
    tmp_path: Path, signing_key: SigningKey, fleet: InProcessFleet, service: FleetService
) -> None:
    devices = DEVICES[:6]
    for device in devices:
        fleet.start(device)
    wait_for(lambda: online(service) == 6, what="6 agents online")
    everywhere(service, make_artifact(tmp_path, signing_key, version=2), len(devices))
    # Installs well and passes the agents' own check, but answers ~20x slower. Made
    # before the traffic starts: quantizing it here would slow every agent's calls.
    slow = upload(service, make_artifact(tmp_path, signing_key, version=3, hidden=100_000))
    traffic = Traffic([fleet.agents[d] for d in devices])
    try:

        def measured_v2(device: str) -> bool:
            windows = service.telemetry(device, limit=5)
            return len(windows) == 5 and all(r.version == 2 and r.predictions for r in windows)

        # The baselines: each device's v2 latency, in the store before the rollout starts.
        wait_for(lambda: all(measured_v2(d) for d in devices), what="v2 telemetry stored")
        for bad in ({"max_p95_ratio": 0.5}, {"max_error_increase": "lots"}):
            with pytest.raises(RolloutError, match="bad"):
                service.create_rollout(RolloutRequest(slow, **bad), actor=OPERATOR)
        request = RolloutRequest(artifact_sha256=slow, canary="2", waves="50,100", soak="30s",
                                 max_failure="10%", max_p95_ratio=3.0)  # fmt: skip
        created = service.create_rollout(request, actor=OPERATOR).rollout
        assert created.policy["health"]["max_p95_ratio"] == 3.0
        rollout_id = created.rollout_id
        wait_for(lambda: state(service, rollout_id) == RolloutState.HALTED, what="halted")
        view = service.rollout(rollout_id)
        canary = [d for d in view.devices if d.stage == 0]
        assert "of stage 0 failed" in view.summary["halt_reason"]
        # The verdict, as saved with the halt (a device's detail shows it only until
        # its revert is confirmed, which may already have happened): a canary device
        # failed on p95 latency against the median of its v2 windows, with no errors.
        saved = service.store.rollout(rollout_id)
        assert saved is not None
        failed = [d for d in saved.snapshot["devices"] if d["stage"] == 0 and d["health_failed"]]
        assert failed, saved.snapshot["devices"]
        for device in failed:
            v2 = statistics.median(w["p95_ms"] for w in device["baseline_windows"])
            assert device["last_health"]["errors"] == 0
            assert device["last_health"]["p95_ms"] > 3.0 * v2  # max_p95_ratio=3.0
        wait_for(lambda: {d.state for d in service.rollout(rollout_id).devices if d.stage == 0}
                 == {"reverted"}, what="the canary reverted")  # fmt: skip
    finally:
        traffic.close()
    assert len(canary) == 2
    assert {d.state for d in service.rollout(rollout_id).devices if d.stage > 0} == {"waiting"}
    actions = [a.action for a in service.audit_log()]
    assert actions.count("rollout.create") == 2
    wait_for(lambda: set(served(service).values()) == {2}, what="every device serves v2")
    assert traffic.calls > 0


def test_pause_holds_the_next_wave_resume_finishes_and_a_late_joiner_is_updated(
    tmp_path: Path, signing_key: SigningKey, fleet: InProcessFleet, service: FleetService
) -> None:
    late = DEVICES[-1]
    for device in DEVICES[:-1]:
        fleet.start(device)
    wait_for(lambda: online(service) == 19, what="19 agents online")
    sha = upload(service, make_artifact(tmp_path, signing_key, version=2))
    request = RolloutRequest(artifact_sha256=sha, canary="2", waves="50,100", soak="1s",
                             max_failure="10%")  # fmt: skip
    rollout_id = service.create_rollout(request, actor=OPERATOR).rollout.rollout_id
    paused = service.pause_rollout(rollout_id, actor=OPERATOR)
    assert paused.rollout.state == RolloutState.PAUSED

    def canary_installed() -> bool:
        devices = service.rollout(rollout_id).devices
        return sum(d.state == "installed" for d in devices) == 2

    wait_for(canary_installed, what="the canary installs while paused")
    # That a paused rollout releases no wave however long it waits is the engine's
    # (test_rollout_plan, fake clock); here: what the service shows meanwhile.
    view = service.rollout(rollout_id)
    assert view.rollout.state == RolloutState.PAUSED
    assert {d.state for d in view.devices if d.stage > 0} == {"waiting"}
    assert sum(v == 2 for v in served(service).values()) == 2
    figures = service.metrics()  # a rollout still going shows its progress
    assert figures.rollout_stages == {rollout_id: 0}
    assert figures.rollout_devices == {(rollout_id, "installed"): 2, (rollout_id, "waiting"): 17}

    fleet.start(late)  # joins the target while the rollout runs
    wait_for(lambda: any(d.device_id == late for d in service.rollout(rollout_id).devices),
             what="the newcomer enters the rollout")  # fmt: skip
    service.resume_rollout(rollout_id, actor=OPERATOR)
    wait_for(lambda: state(service, rollout_id) == RolloutState.COMPLETED, what="completed")
    wait_for(lambda: served(service).get(late) == 2, what="the newcomer serves v2")
    assert set(served(service).values()) == {2}
    assert len(served(service)) == 20
    actions = [a.action for a in service.audit_log()]
    assert actions[-2:] == ["rollout.pause", "rollout.resume"]


def test_a_tag_rollout_takes_devices_joining_the_tag_and_offline_ones_catch_up(
    tmp_path: Path, signing_key: SigningKey, fleet: InProcessFleet, service: FleetService
) -> None:
    lab, away, joiner, outsider = DEVICES[:3], DEVICES[3], DEVICES[4], DEVICES[5]
    for device in [*lab, away]:
        fleet.start(device, tags=("lab",))
    for device in (joiner, outsider):
        fleet.start(device)
    wait_for(lambda: online(service) == 6, what="6 agents online")
    fleet.agents[away].stop()  # known to carry the tag, offline when the rollout starts
    wait_for(lambda: online(service) == 5, what="one agent offline")

    sha = upload(service, make_artifact(tmp_path, signing_key, version=2))
    request = RolloutRequest(artifact_sha256=sha, target="tag:lab", canary="1", waves="100",
                             soak="0.5s")  # fmt: skip
    rollout_id = service.create_rollout(request, actor=OPERATOR).rollout.rollout_id
    wait_for(lambda: state(service, rollout_id) == RolloutState.COMPLETED, what="completed")
    view = service.rollout(rollout_id)
    assert sorted(d.device_id for d in view.devices) == [*lab, away]
    states = {d.device_id: d.state for d in view.devices}
    assert states == {**dict.fromkeys(lab, "installed"), away: "offline"}

    fleet.start(away, tags=("lab",))  # comes back: catches up
    fleet.agents[joiner].stop()
    fleet.start(joiner, tags=("lab",))  # restarted with the tag: joins the rollout
    wait_for(lambda: served(service).get(away) == 2, what="the offline device catches up")
    wait_for(lambda: served(service).get(joiner) == 2, what="the tag's newcomer is updated")
    # The outsider is not in the rollout (a completed rollout has installed every
    # device it holds), so nothing was sent to it; which devices join a tag target
    # is Target.matches (test_fleet).
    devices = {d.device_id: d.state for d in service.rollout(rollout_id).devices}
    assert devices == dict.fromkeys([*lab, away, joiner], "installed")
    assert served(service).get(outsider) is None


@pytest.mark.parametrize("session", ["fedge-test", None])
def test_what_devices_send_while_the_service_is_down_arrives_when_it_is_back(
    tmp_path: Path,
    signing_key: SigningKey,
    fleet: InProcessFleet,
    broker: Mosquitto,
    session: str | None,
) -> None:
    devices = DEVICES[:5]
    first = open_service(tmp_path, broker, signing_key, session=session)
    try:
        for device in devices:
            fleet.start(device)
        wait_for(lambda: online(first) == 5, what="5 agents online")
    finally:
        first.stop()
        first.store.close()
    before = {d: fleet.agents[d].telemetry_published for d in devices}
    wait_for(lambda: all(fleet.agents[d].telemetry_published >= n + 3 for d, n in before.items()),
             what="3 windows from each agent while nobody listens")  # fmt: skip
    fleet.agents[devices[0]].stop()  # and one goes offline meanwhile
    second = open_service(tmp_path, broker, signing_key, session=session)
    try:
        sent = fleet.stop_agents()
        assert sent >= 5 * 3

        def settled() -> bool:
            """Every device's offline status stored: it came after all they sent."""
            rows = [d for d in second.devices() if d.device_id in devices]
            counts = second.ingest.counts()
            return (
                len(rows) == 5
                and not any(d.online for d in rows)
                and counts.pending == 0
                and counts.stored + counts.duplicates == counts.received
            )

        wait_for(settled, what="the offline statuses stored")
        if session is None:  # a clean session: the broker kept nothing meanwhile
            assert second.ingest.counts().received == 0
            assert second.store.telemetry_count() <= sent - 5 * 2  # 3 windows of 5 agents lost
            return
        wait_for(lambda: second.store.telemetry_count() == sent, what="every window stored")
        assert second.store.telemetry_count() == sent
        assert second.ingest.counts().duplicates == 0
        # The offline change that happened while the service was down is in the history.
        assert [p.online for p in second.presence(devices[0])] == [False, True]
    finally:
        second.stop()
        second.store.close()


def test_uploads_that_fail_verification_are_refused_and_nothing_is_stored(
    tmp_path: Path, signing_key: SigningKey, service: FleetService
) -> None:
    (tmp_path / "stranger").mkdir()
    bad = {
        "tampered": make_artifact(tmp_path, signing_key, version=2, tamper_payload=True),
        "untrusted": make_artifact(tmp_path / "stranger", generate_signing_key(), version=3),
        "expired": make_artifact(tmp_path, signing_key, version=4, expired=True),
    }
    for what, path in bad.items():
        with pytest.raises(ArtifactRejectedError):
            service.upload_artifact(path.read_bytes(), actor=OPERATOR)
        assert service.artifacts() == [], what
    with pytest.raises(ArtifactRejectedError):
        service.upload_artifact(b"not an artifact", actor=OPERATOR)
    assert [a.action for a in service.audit_log()] == ["artifact.reject"] * 4
    assert list((service.store.artifact_dir).glob("*")) == []
    # The same good bytes twice are stored once.
    good = make_artifact(tmp_path, signing_key, version=5)
    first = service.upload_artifact(good.read_bytes(), actor=OPERATOR)
    again = service.upload_artifact(good.read_bytes(), actor=OPERATOR)
    assert first == again
    assert [a.sha256 for a in service.artifacts()] == [first.sha256]
    with pytest.raises(NotFoundError):
        service.create_rollout(RolloutRequest(artifact_sha256="0" * 64), actor=OPERATOR)
    with pytest.raises(NotFoundError):
        service.telemetry("nobody")
