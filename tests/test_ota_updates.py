"""Tests for edge_agent.ota.updates: a deploy that takes the place of another one."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from compress.artifact import read_artifact_unverified
from compress.keys import SigningKey
from compress.manifest import Manifest
from compress.signing import SignedManifest, TrustedKeys
from compress.statement import FleetStatement, Target, sign_statement
from edge_agent.ota.fleet_guard import FleetGuard
from edge_agent.ota.model_store import InstalledModel
from edge_agent.ota.updates import Updater
from edge_agent.protocol import (
    Chunk,
    ChunkRequest,
    Deploy,
    FleetStatementMessage,
    InstallState,
    chunk_count,
)
from edge_agent.serving.server import ModelServer
from tests.fleet_support import make_artifact
from tests.ota_support import make_updater

CHUNK = 1024


@dataclass
class Reports:
    """A Reporter that keeps what it was told."""

    sent: list[tuple[str, InstallState, dict[str, Any]]] = field(default_factory=list)

    def report(
        self,
        deployment_id: str,
        state: InstallState,
        model: InstalledModel | Manifest | None,
        **details: Any,
    ) -> None:
        del model
        self.sent.append((deployment_id, state, details))

    def request_chunks(self, request: ChunkRequest) -> bool:
        del request
        return False

    def announce(self) -> None:
        return None

    def failures(self) -> list[tuple[str, str | None, str | None]]:
        return [
            (dep, details.get("code"), details.get("reason"))
            for dep, state, details in self.sent
            if state is InstallState.FAILED
        ]


def deploy_of(artifact: tuple[SignedManifest, bytes], deployment_id: str) -> Deploy:
    signed, payload = artifact
    return Deploy(
        deployment_id=deployment_id,
        transfer_id=hashlib.sha256(payload).hexdigest(),
        total_size=len(payload),
        chunk_size=CHUNK,
        chunk_count=chunk_count(len(payload), CHUNK),
        manifest=signed.to_bytes(),
    )


@pytest.fixture(scope="module")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, signing_keys: list[SigningKey]
) -> dict[str, tuple[SignedManifest, bytes]]:
    directory = tmp_path_factory.mktemp("artifacts")
    key = signing_keys[0]
    return {
        version: read_artifact_unverified(make_artifact(directory, key, version=v, seed=v))
        for version, v in (("v1", 1), ("v2", 2))
    }


@pytest.fixture
def updater(tmp_path: Path, signing_keys: list[SigningKey], reports: Reports) -> Iterator[Updater]:
    updater = make_updater(
        tmp_path / "data", trusted=TrustedKeys.of([signing_keys[0].public_key]), reporter=reports
    )
    yield updater
    updater.close()


@pytest.fixture
def reports() -> Reports:
    return Reports()


def test_a_deploy_of_another_payload_supersedes_the_transfer(
    updater: Updater, reports: Reports, artifacts: dict[str, tuple[SignedManifest, bytes]]
) -> None:
    updater.on_deploy(deploy_of(artifacts["v1"], "dep-1"))
    first = updater.transfer
    assert first is not None
    updater.on_deploy(deploy_of(artifacts["v2"], "dep-2"))
    assert reports.failures() == [("dep-1", "superseded", "superseded by dep-2")]
    assert updater.transfer is not None
    assert updater.transfer.deployment_id == "dep-2"
    assert not first.staged.directory.exists()


def test_a_deploy_of_the_same_payload_continues_the_transfer(
    updater: Updater, reports: Reports, artifacts: dict[str, tuple[SignedManifest, bytes]]
) -> None:
    updater.on_deploy(deploy_of(artifacts["v1"], "dep-1"))
    first = updater.transfer
    updater.on_deploy(deploy_of(artifacts["v1"], "dep-2"))
    assert reports.failures() == [("dep-1", "superseded", "continued as dep-2")]
    assert updater.transfer is first
    assert first is not None
    assert first.deployment_id == "dep-2"
    deploy_json = json.loads((first.staged.directory / "deploy.json").read_bytes())
    assert deploy_json["deployment_id"] == "dep-2"


def statement_naming(
    key: SigningKey, version: int, artifact: tuple[SignedManifest, bytes]
) -> FleetStatementMessage:
    manifest = artifact[0].manifest
    issued = datetime.now(UTC)
    statement = FleetStatement(
        fleet="plant-a",
        version=version,
        issued=issued,
        expires=issued + timedelta(hours=1),
        targets={manifest.name: Target(manifest.version, manifest.sha256)},
    )
    return FleetStatementMessage(statement=sign_statement(statement, [key]).to_bytes())


def send_all_chunks(updater: Updater, artifact: tuple[SignedManifest, bytes]) -> None:
    payload = artifact[1]
    transfer_id = hashlib.sha256(payload).hexdigest()
    for index in range(chunk_count(len(payload), CHUNK)):
        updater.on_chunk(
            Chunk.from_payload(payload, index, chunk_size=CHUNK, transfer_id=transfer_id)
        )


@pytest.mark.parametrize("withdrawn", [False, True])
def test_the_statement_is_checked_again_before_the_install(
    tmp_path: Path,
    signing_keys: list[SigningKey],
    reports: Reports,
    artifacts: dict[str, tuple[SignedManifest, bytes]],
    withdrawn: bool,
) -> None:
    """A statement that stops naming a model during its download stops its install."""
    key = signing_keys[0]
    trusted = TrustedKeys.of([key.public_key])
    guard = FleetGuard("plant-a", tmp_path / "data", trusted=trusted, clock=time.time)
    assert guard.on_statement(statement_naming(key, 1, artifacts["v1"]))
    server = ModelServer()
    updater = make_updater(
        tmp_path / "data",
        trusted=trusted,
        reporter=reports,
        server=server,
        targeting=guard.require_targeted,
    )
    try:
        updater.on_deploy(deploy_of(artifacts["v1"], "dep-1"))
        assert updater.transfer is not None
        if withdrawn:
            assert guard.on_statement(statement_naming(key, 2, artifacts["v2"]))
        send_all_chunks(updater, artifacts["v1"])
    finally:
        updater.close()
    if withdrawn:
        assert [(dep, code) for dep, code, _ in reports.failures()] == [("dep-1", "not_targeted")]
        assert server.active is None
    else:
        assert reports.failures() == []
        assert server.active is not None
        assert server.active.version == 1
