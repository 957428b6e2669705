"""``fedge broker config``: the generated mosquitto config, its checks and its files.

The config text is checked line by line (every setting explained by the comment
above it; client ids bound to usernames; TLS and mutual TLS only when asked for);
a real mosquitto runs it here (an account added with ``fedge broker add-user``), in
tests/test_broker_identity_mqtt.py and tests/test_delivery_mqtt.py.
"""

from __future__ import annotations

import itertools
import logging
import stat
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli.app import app
from coordinator.errors import BrokerSetupError
from coordinator.link.broker_accounts import (
    add_account,
    check_account_name,
    reload_broker,
    remove_account,
)
from coordinator.link.broker_config import (
    BrokerSetup,
    queue_size,
    render_config,
    write_broker_config,
)
from coordinator.link.eviction import evict
from edge_agent.errors import TopicError
from edge_agent.protocol import (
    MOSQUITTO_ACL,
    Channel,
    device_topic,
    is_valid_device_id,
    mosquitto_acl,
    operator_account,
)
from tests.fleet_support import (
    WAIT_S,
    TlsFiles,
    free_port,
    password,
    running_broker,
)
from tests.test_protocol_broker_acl import Client

runner = CliRunner(mix_stderr=False)


def settings(text: str) -> dict[str, str]:
    """The config's settings: first word -> the rest of the line."""
    pairs = (line.split(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    return dict(pairs)


def test_every_setting_is_explained_by_a_comment_above_it(tmp_path: Path) -> None:
    tls = BrokerSetup(tmp_path, tls_cert=tmp_path / "s.pem", tls_key=tmp_path / "s.key",
                      cafile=tmp_path / "ca.pem", crlfile=tmp_path / "crl.pem",
                      operators=("ops",))  # fmt: skip
    for setup in (BrokerSetup(tmp_path), tls):
        lines = render_config(setup).splitlines()
        for previous, line in itertools.pairwise(lines):
            if line and not line.startswith("#"):
                assert previous.startswith("# "), f"{line!r} has no comment"


def test_the_plain_config_binds_client_ids_and_refuses_anonymous_clients(tmp_path: Path) -> None:
    setup = BrokerSetup(tmp_path / "b", fleet_size=500)
    config = settings(render_config(setup))
    assert config == {
        "listener": "1883",
        "use_username_as_clientid": "true",
        "allow_anonymous": "false",
        "password_file": str(tmp_path / "b" / "passwd"),
        "acl_file": str(tmp_path / "b" / "acl"),
        "max_queued_messages": "10000",
        "persistence": "true",
        "persistence_location": f"{tmp_path / 'b' / 'data'}/",
        "autosave_interval": "60",
        "persistent_client_expiration": "14d",
        "pid_file": str(tmp_path / "b" / "mosquitto.pid"),
    }


def test_tls_and_mutual_tls_are_emitted_only_when_configured(tmp_path: Path) -> None:
    server = {"tls_cert": tmp_path / "s.pem", "tls_key": tmp_path / "s.key"}
    tls = settings(render_config(BrokerSetup(tmp_path, bind="10.0.0.2", **server)))
    assert tls["listener"] == "8883 10.0.0.2"
    assert (tls["certfile"], tls["keyfile"]) == (str(tmp_path / "s.pem"), str(tmp_path / "s.key"))
    assert "require_certificate" not in tls
    assert "use_identity_as_username" not in tls  # passwords name the client
    mutual = settings(render_config(BrokerSetup(tmp_path, port=9000, cafile=Path("ca.pem"),
                                                **server)))  # fmt: skip
    assert mutual["listener"] == "9000"
    assert mutual["cafile"] == str(Path("ca.pem").absolute())
    assert mutual["require_certificate"] == "true"
    assert mutual["use_identity_as_username"] == "true"  # the CN is the username ...
    assert mutual["use_username_as_clientid"] == "true"  # ... and the client id
    assert "crlfile" not in mutual
    revoking = settings(render_config(BrokerSetup(tmp_path, cafile=Path("ca.pem"),
                                                  crlfile=Path("crl.pem"), **server)))  # fmt: skip
    assert revoking["crlfile"] == str(Path("crl.pem").absolute())


def test_the_queue_is_sized_for_the_fleet() -> None:
    assert [queue_size(n) for n in (1, 50, 51, 500, 5000)] == [1000, 1000, 1020, 10000, 100000]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert": Path("s.pem")}, "needs both --tls-cert and --tls-key"),
        ({"tls_key": Path("s.key")}, "needs both --tls-cert and --tls-key"),
        ({"cafile": Path("ca.pem")}, "need a TLS listener"),
        ({"crlfile": Path("crl.pem")}, "needs client certificates"),
        ({"port": 0}, "port must be 1..65535"),
        ({"port": 70000}, "port must be 1..65535"),
        ({"fleet_size": 0}, "fleet size must be at least 1"),
        ({"bind": "a b"}, "bad bind address"),
        ({"operators": ("a/b",)}, "invalid operator name"),
    ],
)
def test_inconsistent_settings_are_refused_typed_and_logged(
    tmp_path: Path, fields: dict[str, object], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(BrokerSetupError, match=message):
        BrokerSetup(tmp_path, **fields)  # type: ignore[arg-type]
    assert any(message in record.getMessage() for record in caplog.records)


def test_the_files_are_written_and_the_accounts_kept(tmp_path: Path) -> None:
    setup = BrokerSetup(tmp_path / "broker", operators=("ops", "ops"))
    files = write_broker_config(setup)
    assert files.config.read_text() == render_config(setup)
    assert files.acl.read_text() == mosquitto_acl(["ops"])
    assert files.passwords.read_bytes() == b""
    assert stat.S_IMODE(files.passwords.stat().st_mode) == 0o600
    assert files.data.is_dir()
    files.passwords.write_text("coordinator:hash\n")
    with pytest.raises(BrokerSetupError, match="exists"):
        write_broker_config(setup)
    write_broker_config(setup, overwrite=True)
    assert files.passwords.read_text() == "coordinator:hash\n"  # never replaced


def test_operator_accounts_have_the_coordinators_rights_and_are_never_device_ids() -> None:
    assert operator_account("ops-1") == "coordinator@ops-1"
    assert not is_valid_device_id(operator_account("ops-1"))
    for bad in ("", "a/b", "#", "-x", "x" * 65):
        with pytest.raises(TopicError):
            operator_account(bad)
    rules = [line.split() for line in mosquitto_acl(["ops-1"]).splitlines()]
    assert rules[-4:] == [
        ["user", "coordinator"], ["topic", "readwrite", "fedge/v1/#"],
        ["user", "coordinator@ops-1"], ["topic", "readwrite", "fedge/v1/#"],
    ]  # fmt: skip
    assert mosquitto_acl() == MOSQUITTO_ACL


def test_fedge_broker_config_writes_the_setup(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    result = runner.invoke(app, ["broker", "config", "--out", str(out), "--fleet-size", "500",
                                 "--operator", "ops", "--port", "1884"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    config = settings((out / "mosquitto.conf").read_text())
    assert (config["listener"], config["max_queued_messages"]) == ("1884", "10000")
    assert "user coordinator@ops" in (out / "acl").read_text()
    assert "fedge broker add-user" in result.stdout
    again = runner.invoke(app, ["broker", "config", "--out", str(out)])
    assert again.exit_code == 1
    assert "exists (pass --force to replace it)" in again.stderr
    half = runner.invoke(app, ["broker", "config", "--out", str(out), "--force",
                               "--tls-cert", "s.pem"])  # fmt: skip
    assert half.exit_code == 1
    assert "--tls-key" in half.stderr
    mutual = runner.invoke(app, ["broker", "config", "--out", str(out), "--force",
                                 "--tls-cert", "s.pem", "--tls-key", "s.key", "--cafile", "ca.crt",
                                 "--crlfile", "crl.pem"])  # fmt: skip
    assert mutual.exit_code == 0, mutual.stderr
    assert settings((out / "mosquitto.conf").read_text())["crlfile"] == str(
        Path("crl.pem").absolute()
    )


def test_fedge_broker_acl_prints_the_acl() -> None:
    assert runner.invoke(app, ["broker", "acl"]).stdout == MOSQUITTO_ACL
    with_ops = runner.invoke(app, ["broker", "acl", "--operator", "ops"])
    assert with_ops.stdout == mosquitto_acl(["ops"])


def test_fedge_broker_add_user_creates_an_account_the_broker_accepts(tmp_path: Path) -> None:
    secret = tmp_path / "pi-9.secret"
    secret.write_text(password("pi-9") + "\n")
    with running_broker(tmp_path, [], generated=True) as broker:
        passwd = broker.directory / "passwd"
        result = runner.invoke(app, ["broker", "add-user", "pi-9", "--passwd", str(passwd),
                                     "--secret-file", str(secret)])  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert "pi-9:" in passwd.read_text()
        assert str(secret.read_text().strip()) not in passwd.read_text()  # hashed
        broker.stop()  # mosquitto reads the file at start (or on SIGHUP)
        broker.start()
        Client(broker.port, "pi-9").close()  # fails the test if refused


@pytest.mark.parametrize(
    ("username", "secret", "message"),
    [
        ("bad:name", "s", "unknown kind of account"),
        ("coordinator@", "s", "invalid operator name"),
        ("coordinator@a/b", "s", "invalid operator name"),
        ("pi-9", "", "one non-empty line"),
        ("pi-9", "a\nb", "one non-empty line"),
    ],
)
def test_add_account_refuses_names_the_acl_does_not_know(
    tmp_path: Path, username: str, secret: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(BrokerSetupError, match=message):
        add_account(tmp_path / "passwd", username, secret)
    assert any(message in record.getMessage() for record in caplog.records)
    assert not (tmp_path / "passwd").exists()


def test_accounts_for_the_service_and_operators_are_accepted(tmp_path: Path) -> None:
    for username in ("coordinator", "coordinator@ops", "pi-9"):
        assert check_account_name(username) == username
        add_account(tmp_path / "passwd", username, "secret")
    names = [line.split(":")[0] for line in (tmp_path / "passwd").read_text().splitlines()]
    assert names == ["coordinator", "coordinator@ops", "pi-9"]
    assert stat.S_IMODE((tmp_path / "passwd").stat().st_mode) == 0o600


def test_a_removed_account_is_disconnected_by_the_reload_and_cannot_reconnect(
    tmp_path: Path,
) -> None:
    # What `fedge device revoke` relies on (mosquitto 2.0): SIGHUP re-reads the
    # password file and drops the connected clients it no longer knows.
    with running_broker(tmp_path, ["pi-9", "pi-8"], generated=True) as broker:
        passwd = broker.directory / "passwd"
        revoked, kept = Client(broker.port, "pi-9"), Client(broker.port, "pi-8")
        dropped = threading.Event()
        revoked.mqtt.on_disconnect = lambda *_args: dropped.set()
        kept_dropped = threading.Event()
        kept.mqtt.on_disconnect = lambda *_args: kept_dropped.set()
        try:
            assert remove_account(passwd, "pi-9") is True
            assert remove_account(passwd, "pi-9") is False  # gone already: no error
            assert reload_broker(broker.directory / "mosquitto.pid") == broker.process.pid
            assert dropped.wait(WAIT_S), "the removed account stayed connected"
            with pytest.raises(AssertionError, match="could not connect"):
                Client(broker.port, "pi-9")
            kept.publish(device_topic("pi-8", Channel.EVENTS), b"still here")
            assert not kept_dropped.is_set()
        finally:
            revoked.mqtt.loop_stop()
            kept.close()


def test_reload_and_remove_refuse_what_they_cannot_do_typed_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        with pytest.raises(BrokerSetupError, match="cannot read the broker's pid"):
            reload_broker(tmp_path / "missing.pid")
        (tmp_path / "bad.pid").write_text("1\n")
        with pytest.raises(BrokerSetupError, match="no usable pid"):
            reload_broker(tmp_path / "bad.pid")
        with pytest.raises(BrokerSetupError, match="no password file"):
            remove_account(tmp_path / "passwd", "pi-9")
    assert len(caplog.records) == 3


def test_an_eviction_needs_a_tls_broker_it_can_reach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = TlsFiles.create(tmp_path / "tls")
    cert, key = tls.issue("pi-9")
    files = {"ca_file": tls.ca, "cert_file": cert, "key_file": key}
    with caplog.at_level(logging.ERROR):
        with pytest.raises(BrokerSetupError, match="not mqtts"):
            evict("mqtt://127.0.0.1:1883", "pi-9", **files)
        with pytest.raises(BrokerSetupError, match="cannot evict pi-9"):
            evict(f"mqtts://127.0.0.1:{free_port()}", "pi-9", timeout_s=1.0, **files)
    assert len([r for r in caplog.records if "eviction failed" in r.getMessage()]) == 2
