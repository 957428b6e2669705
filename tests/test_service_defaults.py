"""Service defaults that one device or one mistake cannot abuse (issue 17, item 6).

* A rollout created without ``min_failed_devices`` takes the service's
  ``rollouts.min_failed_devices`` (default 2: one failing device cannot halt a
  stage of two or more); a request may set its own.
* A run started through the service bounds each device's uploads in flight by
  ``runs.upload_budget_mib`` (0: four times the largest update); the budget itself
  is tested in test_uploads.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from compress.keys import SigningKey
from compress.signing import TrustedKeys
from coordinator.link.memory import MemoryHub
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR, RolloutRequest, RunRequest
from coordinator.service.runs import RunManager
from coordinator.service.store import MEMORY, Store
from edge_agent.protocol import Status
from tests.fleet_support import make_artifact

DEVICES = ("d1", "d2", "d3")


def open_service(key: SigningKey, settings: ServiceSettings, tmp: Path) -> FleetService:
    hub = MemoryHub()
    service = FleetService(
        Store.open(MEMORY, artifact_dir=tmp / "artifacts"),
        hub,
        TrustedKeys.of([key.public_key]),
        settings=settings,
    )
    service.start()
    for device in DEVICES:
        hub.receive(device, Status(online=True, agent_version="1"))
    return service


@pytest.fixture
def service(signing_key: SigningKey, tmp_path: Path) -> Iterator[FleetService]:
    service = open_service(signing_key, ServiceSettings(accept_wait_s=0.05), tmp_path)
    try:
        yield service
    finally:
        service.stop()


def _rollout_policy(service: FleetService, tmp_path: Path, key: SigningKey, **kw: object) -> dict:  # type: ignore[type-arg]
    data = make_artifact(tmp_path, key, version=2).read_bytes()
    sha = service.upload_artifact(data, actor=CLI_ACTOR).sha256
    request = RolloutRequest(artifact_sha256=sha, canary="3", soak="1h", **kw)  # type: ignore[arg-type]
    return service.create_rollout(request, actor=CLI_ACTOR).rollout.policy


def test_a_rollout_takes_the_service_s_halt_floor(
    service: FleetService, tmp_path: Path, signing_key: SigningKey
) -> None:
    assert _rollout_policy(service, tmp_path, signing_key)["min_failed_devices"] == 2


def test_a_rollout_request_may_set_its_own_halt_floor(
    service: FleetService, tmp_path: Path, signing_key: SigningKey
) -> None:
    policy = _rollout_policy(service, tmp_path, signing_key, min_failed_devices=1)
    assert policy["min_failed_devices"] == 1


def test_the_service_setting_is_the_default(tmp_path: Path, signing_key: SigningKey) -> None:
    service = open_service(
        signing_key, ServiceSettings(rollout_min_failed_devices=3, accept_wait_s=0.05), tmp_path
    )
    try:
        assert _rollout_policy(service, tmp_path, signing_key)["min_failed_devices"] == 3
    finally:
        service.stop()


def test_a_run_through_the_service_gets_the_upload_budget(tmp_path: Path) -> None:
    request = RunRequest(rounds=1, min_clients=1, config={"features": 4, "classes": 2})
    store = Store.open(MEMORY, artifact_dir=tmp_path)
    try:
        runs = RunManager(MemoryHub(), store, upload_budget_bytes=5 << 20)
        assert runs.config_of(request).upload_budget_bytes == 5 << 20
        assert RunManager(MemoryHub(), store).config_of(request).upload_budget_bytes is None
    finally:
        store.close()
