"""``fedge fleet`` and ``fedge deploy --fleet`` without a broker: what is refused
before anything connects, how ``--model`` values are read, and how ``fedge devices``
shows a device that holds no fresh statement (``stale``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from compress.keys import generate_signing_key, save_keypair
from coordinator.cli.app import app
from coordinator.cli.device_views import devices_json, devices_table
from coordinator.cli.fleet import parse_target
from coordinator.delivery.deliveries import Artifact
from coordinator.errors import FleetStatementError
from coordinator.service.ingest import status_document
from coordinator.service.store.records import DeviceRow
from edge_agent.protocol import Status
from tests.conftest import ArtifactFactory

SHA = "ab" * 32


def run(*args: str) -> tuple[int, str]:
    result = CliRunner(mix_stderr=False).invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stderr


def test_a_model_is_an_artifact_file_or_name_at_version_colon_sha256(
    artifact_file: ArtifactFactory,
) -> None:
    path = artifact_file(version=7)
    name, target = parse_target(str(path))
    assert (name, target.version, target.sha256) == ("digits", 7, Artifact.load(path).transfer_id)
    name, target = parse_target(f"anomaly@2:{SHA}")
    assert (name, target.version, target.sha256) == ("anomaly", 2, SHA)


@pytest.mark.parametrize(
    "text", ["digits@2", f"digits@x:{SHA}", "no-such-file.fedge", "a@0:" + SHA]
)
def test_a_bad_model_is_refused(text: str) -> None:
    with pytest.raises(FleetStatementError):
        parse_target(text)


def test_deploy_fleet_is_refused_through_the_api(
    artifact_file: ArtifactFactory, clean_fedge_env: None
) -> None:
    status, err = run(
        "deploy", str(artifact_file()), "--api", "http://127.0.0.1:9", "--token", "t",
        "--fleet", "plant-a", "--statement-key", "k.pem",
    )  # fmt: skip
    assert status == 1
    assert "--fleet is for --broker" in err


def test_deploy_fleet_needs_a_statement_key(
    artifact_file: ArtifactFactory, clean_fedge_env: None
) -> None:
    status, err = run(
        "deploy", str(artifact_file()), "--broker", "mqtt://127.0.0.1:9", "--fleet", "plant-a"
    )
    assert status == 1
    assert "--fleet needs --statement-key" in err


def test_publish_refuses_a_bad_fleet_id_before_connecting(
    clean_fedge_env: None, tmp_path: Path
) -> None:
    status, err = run(
        "fleet", "publish", "--fleet", "bad/id", "--key", str(tmp_path / "none.pem"),
        "--broker", "mqtt://127.0.0.1:9", "--connect-timeout", "1",
    )  # fmt: skip
    assert status == 1
    assert "invalid fleet id 'bad/id'" in err


def test_fleet_without_a_subcommand_is_still_the_device_list(clean_fedge_env: None) -> None:
    status, err = run("fleet", "--broker", "mqtt://127.0.0.1:9", "--connect-timeout", "1")
    assert status == 1
    assert "cannot connect to mqtt://127.0.0.1:9" in err


def test_a_device_without_a_fresh_statement_is_listed_as_stale() -> None:
    fresh, stale = (
        DeviceRow(
            device_id=name,
            first_seen=0.0,
            last_seen=100.0,
            online=True,
            status=status_document(Status(online=True, agent_version="1", stale=flag)),
            tags=(),
            model=None,
            version=None,
        )
        for name, flag in (("fresh", False), ("held", True))
    )
    doc = devices_json([fresh, stale], now=100.0)
    assert [d["stale"] for d in doc["devices"]] == [False, True]
    console = Console(width=200, record=True)
    console.print(devices_table([fresh, stale], now=100.0))
    lines = console.export_text().splitlines()
    assert any("held" in line and "online, stale" in line for line in lines)
    assert not any("fresh" in line and "stale" in line for line in lines)


def test_publish_with_an_encrypted_key_and_no_password_fails_before_connecting(
    clean_fedge_env: None, tmp_path: Path
) -> None:
    private, _public = save_keypair(
        generate_signing_key(), tmp_path / "statement", password=b"correct horse battery"
    )
    status, err = run(
        "fleet", "publish", "--fleet", "plant-a", "--key", str(private),
        "--broker", "mqtt://127.0.0.1:9", "--connect-timeout", "1",
    )  # fmt: skip
    assert status == 1
    assert "--key-password-file" in err
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    status, err = run(
        "fleet", "publish", "--fleet", "plant-a", "--key", str(private),
        "--key-password-file", str(wrong),
        "--broker", "mqtt://127.0.0.1:9", "--connect-timeout", "1",
    )  # fmt: skip
    assert status == 1
    assert "password" in err.lower()
