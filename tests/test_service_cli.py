"""``fedge coordinator init | serve | token``, in process (nothing here serves)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from compress.keys import generate_signing_key, save_keypair
from coordinator.cli import service as service_cli
from coordinator.cli.app import app
from coordinator.service.config import ServiceConfig
from coordinator.service.config_reader import example_service_config
from coordinator.service.main import run_service
from coordinator.service.operations import CLI_ACTOR
from coordinator.service.store import Store
from coordinator.service.tokens import Role
from edge_agent.config.agent import TrustConfig
from edge_agent.errors import ConfigError

runner = CliRunner(mix_stderr=False)


def fedge(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run every command in tmp_path, so no ./coordinator.toml is picked up by accident."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDGE_BROKER_PASSWORD", raising=False)
    return tmp_path


def create_token(db: Path, role: str = "operator", *extra: str) -> str:
    result = fedge("coordinator", "token", "create", "--role", role, "--db", db, *extra)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


# --------------------------------------------------------------------------- init


def test_init_writes_the_template_and_refuses_to_overwrite(tmp_path: Path) -> None:
    result = fedge("coordinator", "init")
    assert result.exit_code == 0, result.stderr
    path = tmp_path / "coordinator.toml"
    assert path.read_text() == example_service_config()
    assert "fedge coordinator serve" in result.stdout
    assert "fedge keys generate --out keys" in result.stdout

    path.write_text("# edited\n")
    result = fedge("coordinator", "init")
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == "error: coordinator.toml already exists; pass --force to overwrite it"
    )
    assert path.read_text() == "# edited\n"

    assert fedge("coordinator", "init", "--force").exit_code == 0
    assert path.read_text() == example_service_config()


def test_init_to_another_path_names_it_in_the_next_steps(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = fedge("coordinator", "init", "etc/fleet.toml")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "etc" / "fleet.toml").read_text() == example_service_config()
    assert "fedge coordinator serve --config etc/fleet.toml" in result.stdout
    assert "fedge keys generate --out etc/keys" in result.stdout


# --------------------------------------------------------------------------- tokens


def test_token_create_prints_only_the_token_on_stdout(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    result = fedge("coordinator", "token", "create", "--role", "viewer", "--name", "grafana",
                   "--db", db)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert token.startswith("fedge_")
    assert "shown only this once" in result.stderr
    assert token not in result.stderr
    with Store.open(db) as store:
        row = store.authenticate(token, time.time())
        assert row is not None
        assert (row.name, row.role) == ("grafana", Role.VIEWER)
        assert row.token_id in result.stderr
        (entry,) = store.audit_log()
        assert (entry.actor, entry.action, entry.target) == (
            CLI_ACTOR.name,
            "token.create",
            row.token_id,
        )


def test_token_commands_find_the_database_through_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "coordinator.toml").write_text('db = "state.db"\n')
    token = create_token_via_config(conf / "coordinator.toml")
    with Store.open(conf / "state.db") as store:
        assert store.authenticate(token, time.time()) is not None
    # ./coordinator.toml is the default config file
    (tmp_path / "coordinator.toml").write_text('db = "conf/state.db"\n')
    result = fedge("coordinator", "token", "list", "--json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 1


def create_token_via_config(config: Path) -> str:
    result = fedge("coordinator", "token", "create", "--role", "operator", "--config", config)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def test_token_list_shows_every_token_without_secrets(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    viewer = create_token(db, "viewer", "--name", "dashboard")
    operator = create_token(db, "operator", "--name", "ci")
    result = fedge("coordinator", "token", "list", "--db", db, "--json")
    assert result.exit_code == 0, result.stderr
    tokens = json.loads(result.stdout)["tokens"]
    assert [(t["name"], t["role"], t["revoked"]) for t in tokens] == [
        ("dashboard", "viewer", False),
        ("ci", "operator", False),
    ]
    assert set(tokens[0]) == {"token_id", "name", "role", "created_at", "last_used_at",
                              "revoked_at", "revoked", "expires_at", "expired"}  # fmt: skip
    assert [(t["expires_at"], t["expired"]) for t in tokens] == [(None, False), (None, False)]
    table = fedge("coordinator", "token", "list", "--db", db)
    assert table.exit_code == 0, table.stderr
    for header in ("ID", "NAME", "ROLE", "LAST USED", "EXPIRES", "STATE"):
        assert header in table.stdout
    for token in tokens:
        assert token["token_id"] in table.stdout
    for secret in (viewer, operator):
        assert secret not in result.stdout + table.stdout


def test_a_token_made_with_expires_in_expires(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    before = time.time()
    result = fedge("coordinator", "token", "create", "--role", "operator", "--name", "ci",
                   "--expires-in", "30d", "--db", db)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    token = result.stdout.strip()
    assert "it expires 20" in result.stderr
    month = 30 * 86400.0
    listed = json.loads(fedge("coordinator", "token", "list", "--db", db, "--json").stdout)
    [entry] = listed["tokens"]
    assert before + month <= entry["expires_at"] <= time.time() + month
    assert entry["expired"] is False
    with Store.open(db) as store:
        assert store.authenticate(token, time.time()) is not None
        assert store.authenticate(token, entry["expires_at"]) is None
        [audit] = store.audit_log()
        assert audit.detail["expires_at"] == entry["expires_at"]
    table = fedge("coordinator", "token", "list", "--db", db)
    assert "active" in table.stdout
    assert time.strftime("%Y-%m-%d", time.gmtime(entry["expires_at"])) in table.stdout


@pytest.mark.parametrize("bad", ["0", "0d", "soon", "-1d", "5y"])
def test_a_bad_expires_in_is_one_error_line(tmp_path: Path, bad: str) -> None:
    db = tmp_path / "state.db"
    result = fedge("coordinator", "token", "create", "--role", "viewer", "--expires-in", bad,
                   "--db", db)  # fmt: skip
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: --expires-in"), line
    assert result.stdout == ""
    assert not db.exists()


def test_a_revoked_token_no_longer_authenticates(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    token = create_token(db)
    kept = create_token(db, "viewer")
    with Store.open(db) as store:
        row = store.authenticate(token, time.time())
        assert row is not None
        token_id = row.token_id

    result = fedge("coordinator", "token", "revoke", token_id, "--db", db)
    assert result.exit_code == 0, result.stderr
    assert f"revoked token {token_id}" in result.stdout
    with Store.open(db) as store:
        assert store.authenticate(token, time.time()) is None
        assert store.authenticate(kept, time.time()) is not None
        assert [entry.action for entry in store.audit_log()][-1] == "token.revoke"

    again = fedge("coordinator", "token", "revoke", token_id, "--db", db)
    assert again.exit_code == 0, again.stderr
    assert "already revoked" in again.stdout
    listed = json.loads(fedge("coordinator", "token", "list", "--db", db, "--json").stdout)
    assert [t["revoked"] for t in listed["tokens"]] == [True, False]


def test_revoking_an_unknown_token_fails_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    create_token(db)
    result = fedge("coordinator", "token", "revoke", "0123456789ab", "--db", db)
    assert result.exit_code == 1
    assert result.stderr == "error: no token '0123456789ab'\n"


def test_token_commands_need_a_database(tmp_path: Path) -> None:
    result = fedge("coordinator", "token", "create", "--role", "viewer")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: missing db: pass --db PATH")
    missing = tmp_path / "typo.db"
    for command in (("list",), ("revoke", "0123456789ab")):
        result = fedge("coordinator", "token", *command, "--db", missing)
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: no database at {missing}")
    assert not missing.exists()


def test_token_create_refuses_a_bad_role_or_name(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    result = fedge("coordinator", "token", "create", "--role", "admin", "--db", db)
    assert result.exit_code == 2  # usage error
    result = fedge("coordinator", "token", "create", "--role", "viewer", "--name", "a\x1b[31m",
                   "--db", db)  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --name must be 1-100 printable characters")


# --------------------------------------------------------------------------- serve


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> list[ServiceConfig]:
    """Record what ``serve`` would run, instead of running it."""
    ran: list[ServiceConfig] = []
    monkeypatch.setattr(service_cli, "run_service", ran.append)
    monkeypatch.setattr(service_cli, "configure_logging", lambda _level: None)
    return ran


def test_serve_builds_its_config_from_flags_alone(
    tmp_path: Path, no_serving: list[ServiceConfig]
) -> None:
    result = fedge("coordinator", "serve", "--db", "s.db", "--embedded-broker", "--dev",
                   "--trust", "k.pub", "--bind", "127.0.0.1:9123")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (config,) = no_serving
    assert config.db == tmp_path / "s.db"
    assert config.embedded_broker
    assert config.trust.keys == (tmp_path / "k.pub",)
    assert config.bind_port == 9123


def test_serve_reads_every_kind_of_flag_as_its_schema_key_says(
    tmp_path: Path, no_serving: list[ServiceConfig]
) -> None:
    # a number, a repeated path list, a switch, a directory, and a path to a file
    result = fedge("coordinator", "serve", "--db", "s.db", "--embedded-broker", "--dev",
                   "--embedded-broker-port", "1999", "--trust", "a.pub", "--trust", "b.pub",
                   "--threshold", "2", "--artifact-dir", "store")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (config,) = no_serving
    assert (config.embedded_broker, config.embedded_broker_port) == (True, 1999)
    assert config.trust.keys == (tmp_path / "a.pub", tmp_path / "b.pub")
    assert config.trust.threshold == 2
    assert config.artifact_dir == tmp_path / "store"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--db", "."), "'.' is a directory"),
        (("--artifact-dir", "f"), "'f' is a file"),
        (("--threshold", "two"), "'two' is not a valid integer"),
    ],
)
def test_serve_refuses_a_flag_value_of_the_wrong_kind(
    tmp_path: Path, no_serving: list[ServiceConfig], args: tuple[str, ...], expected: str
) -> None:
    (tmp_path / "f").write_text("")
    result = fedge("coordinator", "serve", "--embedded-broker", "--dev", *args)
    assert result.exit_code == 2  # usage error
    assert expected in " ".join(result.stderr.split())
    assert not no_serving


def test_serve_flags_beat_the_config_file(
    tmp_path: Path, no_serving: list[ServiceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "coordinator.toml").write_text(example_service_config())
    (tmp_path / "password").write_text("pw\n")
    monkeypatch.setenv("FEDGE_BROKER_PASSWORD", "from-env")
    result = fedge("coordinator", "serve", "--broker", "mqtt://10.0.0.2", "--log-level", "debug")
    assert result.exit_code == 0, result.stderr
    (config,) = no_serving
    assert config.broker is not None
    assert (config.broker.host, config.broker.password) == ("10.0.0.2", "from-env")
    assert not config.embedded_broker
    assert config.log_level == "debug"
    assert config.db == tmp_path / "state.db"  # from the file
    result = fedge("coordinator", "serve", "--broker", "mqtt://h", "--password-file", "password")
    assert result.exit_code == 0, result.stderr
    assert no_serving[1].broker is not None
    assert no_serving[1].broker.password == "pw"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "error: missing db: pass --db PATH or set db in a config file (--config)\n"),
        (("--db", "s.db", "--trust", "k.pub"), "error: no broker: pass --broker"),
        (("--db", "s.db", "--embedded-broker"), "error: no trusted keys:"),
        (("--db", "s.db", "--embedded-broker", "--trust", "k.pub", "--broker", "mqtt://h"),
         "error: --embedded-broker: both a broker URL and the embedded broker are set"),
        (("--db", "s.db", "--embedded-broker", "--trust", "k.pub"),
         "error: --embedded-broker: the embedded broker accepts any client without a password"),
        (("--db", "s.db", "--embedded-broker", "--dev", "--trust", "k.pub", "--bind", "0.0.0.0"),
         "error: --bind: bind address '0.0.0.0': expected HOST:PORT"),
        (("--config", "missing.toml",), "error: missing.toml: no such config file"),
    ],
)  # fmt: skip
def test_serve_reports_a_bad_configuration_in_one_line(
    args: tuple[str, ...], expected: str, no_serving: list[ServiceConfig]
) -> None:
    result = fedge("coordinator", "serve", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(expected)
    assert result.stderr.count("\n") == 1
    assert not no_serving


def test_serve_names_an_unknown_key_of_the_file(
    tmp_path: Path, no_serving: list[ServiceConfig]
) -> None:
    (tmp_path / "coordinator.toml").write_text('db = "s.db"\n[broker]\nembeded = true\n')
    result = fedge("coordinator", "serve")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: coordinator.toml: unknown key broker.embeded (did you mean broker.embedded?)\n"
    )


def test_serve_fails_before_starting_anything_when_a_key_file_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_cli, "configure_logging", lambda _level: None)
    save_keypair(generate_signing_key(), tmp_path / "keys")
    result = fedge("coordinator", "serve", "--db", "s.db", "--embedded-broker", "--dev",
                   "--trust", "keys/signing.pub", "--trust", "keys/other.pub")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == f"error: trust.keys: {tmp_path}/keys/other.pub: no such key file\n"
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_an_api_reachable_from_the_network_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str, warned: bool
) -> None:
    config = ServiceConfig(
        db=tmp_path / "s.db",
        trust=TrustConfig(keys=(tmp_path / "missing.pub",)),
        embedded_broker=True,
        dev=True,
        bind_host=host,
    )
    with (
        caplog.at_level(logging.WARNING, logger="coordinator.service.main"),
        pytest.raises(ConfigError, match="no such key file"),  # stops before binding
    ):
        run_service(config)
    assert ("reachable from the network" in caplog.text) is warned
    assert ("behind a reverse proxy that terminates TLS" in caplog.text) is warned
