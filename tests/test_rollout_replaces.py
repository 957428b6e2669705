"""A rollout shows what it replaces: its model's lineage parent and what the targeted
devices not on it serve, in the service's rollout view (API, ``fedge rollout status``).

Three devices report (through their status) the model they serve: two run digits v1,
one runs nothing. Digits v2, packaged with v1 as its lineage parent, is rolled out
(the in-memory hub: nobody installs it, so the view shows the fleet as it was).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from compress.families import init_weights
from compress.keys import SigningKey
from compress.lineage import Lineage, Trigger
from compress.signing import TrustedKeys
from coordinator.cli.service_views import rollout_view
from coordinator.delivery.lineage import code_version, parent_of, replaced_by, stored_link
from coordinator.delivery.packaging import package_weights
from coordinator.link.memory import MemoryHub
from coordinator.service.api import create_app
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR, RolloutRequest
from coordinator.service.store import MEMORY, Store
from coordinator.service.tokens import Role
from edge_agent.protocol import ModelInfo, Status
from tests.api_support import TestClient, bearer
from tests.conftest import make_manifest
from tests.fleet_support import wait_for


def _package(tmp: Path, key: SigningKey, version: int, lineage: Lineage | None) -> bytes:
    weights = init_weights("softmax", [4, 3], np.random.default_rng(version))
    out = tmp / f"digits-{version}.fedge"
    package_weights("softmax", weights, name="digits", version=version, keys=[key], out=out,
                    now=datetime.now(UTC), lineage=lineage)  # fmt: skip
    return out.read_bytes()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(MEMORY, artifact_dir=tmp_path / "artifacts") as store:
        yield store


@pytest.fixture
def service(signing_key: SigningKey, store: Store) -> Iterator[FleetService]:
    hub = MemoryHub()
    service = FleetService(store, hub, TrustedKeys.of([signing_key.public_key]),
                           settings=ServiceSettings(accept_wait_s=0.05))  # fmt: skip
    service.start()
    v1 = ModelInfo(name="digits", version=1, sha256=hashlib.sha256(b"v1").hexdigest())
    for device, models in (("d1", (v1,)), ("d2", (v1,)), ("d3", ())):
        hub.receive(device, Status(online=True, agent_version="1", models=models))
    try:
        # The ingest writes statuses from its own thread: the view reads what is stored.
        wait_for(
            lambda: (
                sorted((d.device_id, d.version) for d in store.devices())
                == [("d1", 1), ("d2", 1), ("d3", None)]
            ),
            what="the three statuses stored",
        )
        yield service
    finally:
        service.stop()


def test_the_rollout_view_names_the_parent_and_what_devices_serve(
    service: FleetService, store: Store, signing_key: SigningKey, tmp_path: Path
) -> None:
    parent = service.upload_artifact(_package(tmp_path, signing_key, 1, None), actor=CLI_ACTOR)
    link = stored_link(parent.manifest, parent.sha256)
    assert link is not None
    lineage = Lineage(
        trigger=Trigger.manual(), code=code_version(), parent=parent_of(link.manifest)
    )
    child = service.upload_artifact(_package(tmp_path, signing_key, 2, lineage), actor=CLI_ACTOR)
    request = RolloutRequest(artifact_sha256=child.sha256, canary="1", soak="1h")
    view = service.create_rollout(request, actor=CLI_ACTOR)
    replaces = view.summary["replaces"]
    assert replaces["parent"] == {"name": "digits", "version": 1, "sha256": link.manifest.sha256}
    assert replaces["serving"] == [
        {"model": "digits", "version": 1, "devices": 2},
        {"model": None, "version": None, "devices": 1},
    ]
    console = Console(record=True, width=200)
    console.print(rollout_view(view, now=view.rollout.created_at))
    text = console.export_text()
    assert "replaces" in text
    assert "parent digits v1; serving digits v1 on 2 devices, nothing on 1 device" in text

    _row, token = store.add_token("viewer", Role.VIEWER, 1.0)
    with TestClient(create_app(service, authenticate=service.authenticate)) as client:
        body = client.get(f"/v1/rollouts/{view.rollout.rollout_id}", headers=bearer(token))
    assert body.status_code == 200, body.text
    assert body.json()["summary"]["replaces"] == replaces


def test_devices_already_on_the_model_are_not_counted_and_no_lineage_means_no_parent() -> None:
    manifest = make_manifest(version=3)
    serving = [("digits", 3), ("digits", 2), ("digits", 3), (None, None), ("other", 7)]
    assert replaced_by(manifest, serving) == {
        "parent": None,
        "serving": [
            {"model": None, "version": None, "devices": 1},
            {"model": "digits", "version": 2, "devices": 1},
            {"model": "other", "version": 7, "devices": 1},
        ],
    }
