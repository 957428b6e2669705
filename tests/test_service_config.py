"""``coordinator.service.config``: the service's config from TOML and flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from coordinator.errors import CoordinatorError, ServiceConfigError
from coordinator.link.hub import HubConfig, hub_client_id
from coordinator.service.api.app import MIB
from coordinator.service.api.auth_limits import AuthLimits
from coordinator.service.config import KNOWN_KEYS, ApiSettings, ServiceConfig, TelemetryStorage
from coordinator.service.config_reader import (
    build_service_config,
    example_service_config,
    store_location,
)
from coordinator.service.fleet_service import ServiceSettings
from edge_agent.config.agent import BrokerConfig, TrustConfig, load_config_file
from edge_agent.protocol import is_valid_device_id

FLAGS = {
    "db": "--db",
    "bind": "--bind",
    "broker.url": "--broker",
    "broker.embedded": "--embedded-broker",
    "broker.password_file": "--password-file",
    "trust.keys": "--trust",
}

MINIMAL: dict[str, Any] = {
    "db": "state.db",
    "dev": True,  # the embedded broker needs it
    "broker": {"embedded": True},
    "trust": {"keys": ["k.pub"]},
}


def build(
    file_values: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    *,
    base_dir: Path = Path("/etc/fedge"),
    password: str | None = None,
) -> ServiceConfig:
    return build_service_config(
        file_values,
        overrides or {},
        base_dir=base_dir,
        file_label="coordinator.toml",
        override_labels=FLAGS,
        password=password,
    )


def error_of(file_values: dict[str, Any], overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ServiceConfigError) as caught:
        build(file_values, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def with_(section: str, **values: Any) -> dict[str, Any]:
    """MINIMAL with ``values`` merged into ``section`` ("" for top-level keys)."""
    merged = {**MINIMAL}
    if section:
        merged[section] = {**merged.get(section, {}), **values}
    else:
        merged.update(values)
    return merged


# --------------------------------------------------------------------------- the template


def test_the_template_parses_to_a_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "coordinator.toml"
    path.parent.mkdir()
    path.write_text(example_service_config())
    config = build(load_config_file(path), base_dir=path.parent)
    assert config.db == tmp_path / "conf" / "state.db"
    assert config.trust == TrustConfig(keys=(tmp_path / "conf" / "keys" / "signing.pub",))
    # Not the anonymous embedded broker: a broker URL to edit.
    assert not config.embedded_broker
    assert not config.dev
    assert config.broker is not None
    assert config.broker.url == "mqtts://broker.example.net:8883"
    assert config.broker.username == "coordinator"
    assert (config.bind_host, config.bind_port) == ("127.0.0.1", 8780)
    assert config.bind_is_loopback
    assert config.telemetry == TelemetryStorage()
    assert config.api == ApiSettings()
    assert config.log_level == "info"


def test_every_key_is_in_the_template() -> None:
    for key in KNOWN_KEYS:
        assert f"{key.rpartition('.')[2]} = " in example_service_config(), key


# --------------------------------------------------------------------------- values


def test_minimal_config_has_the_documented_defaults() -> None:
    config = build(MINIMAL)
    assert config.db == Path("/etc/fedge/state.db")
    assert config.artifact_dir is None
    assert config.bind == "127.0.0.1:8780"
    assert config.api_url == "http://127.0.0.1:8780"
    assert config.broker_url == "mqtt://127.0.0.1:1883"
    assert config.settings() == ServiceSettings(
        telemetry_flush_s=0.5,
        telemetry_max_rows=1_000_000,
        telemetry_max_age_s=7 * 86400.0,
        rollout_tick_s=1.0,
        upload_dir=Path("/etc/fedge/uploads"),
    )
    api = config.api_config()
    assert (api.max_body_bytes, api.max_artifact_bytes, api.docs) == (MIB, 512 * MIB, True)


def test_settings_and_api_config_follow_the_file() -> None:
    config = build(
        {
            **MINIMAL,
            "telemetry": {
                "flush_s": 2,
                "retention_rows": 0,
                "retention_days": 0.5,
                "drift_windows": 3,
            },
            "api": {"max_body_mib": 2, "max_artifact_mib": 64, "docs": False},
            "rollouts": {"tick_s": 0.25},
            "runs": {"upload_dir": "spool"},
        }
    )
    assert config.settings() == ServiceSettings(
        telemetry_flush_s=2.0,
        telemetry_max_rows=None,
        telemetry_max_age_s=43200.0,
        drift_windows=3,
        rollout_tick_s=0.25,
        upload_dir=Path("/etc/fedge/spool"),
    )
    api = config.api_config()
    assert (api.max_body_bytes, api.max_artifact_bytes, api.docs) == (2 * MIB, 64 * MIB, False)
    assert build(with_("telemetry", retention_days=0)).settings().telemetry_max_age_s is None


def test_the_failed_authentication_limits_follow_the_file() -> None:
    assert build(MINIMAL).api_config().auth_limits == AuthLimits(
        max_failures=10, window_s=60.0, lockout_s=60.0
    )
    config = build(
        {**MINIMAL, "api": {"auth_max_failures": 3, "auth_window_s": 5, "auth_lockout_s": 600}}
    )
    assert config.api_config().auth_limits == AuthLimits(
        max_failures=3, window_s=5.0, lockout_s=600.0
    )


def test_the_halt_floor_and_the_upload_budget_follow_the_file() -> None:
    settings = build(MINIMAL).settings()
    assert settings.rollout_min_failed_devices == 2
    assert settings.upload_budget_bytes is None  # 4x the largest update
    config = build(
        {**MINIMAL, "rollouts": {"min_failed_devices": 1}, "runs": {"upload_budget_mib": 8}}
    )
    assert config.settings().rollout_min_failed_devices == 1
    assert config.settings().upload_budget_bytes == 8 * MIB


def test_a_broker_url_with_credentials_and_tls(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("  s3cret\n")
    config = build(
        {
            **MINIMAL,
            "broker": {
                "url": "mqtts://broker.example.net",
                "password_file": "password",
                "ca_file": "ca.pem",
            },
        },
        base_dir=tmp_path,
    )
    assert config.broker == BrokerConfig(
        "broker.example.net",
        8883,
        True,
        username="coordinator",
        password="s3cret",
        ca_file=tmp_path / "ca.pem",
    )
    assert not config.embedded_broker
    assert config.broker_url == "mqtts://broker.example.net:8883"


def test_the_password_falls_back_to_the_one_given_and_a_file_beats_it(tmp_path: Path) -> None:
    url = {"url": "mqtt://127.0.0.1"}
    config = build({**MINIMAL, "broker": url}, password="from-env")
    assert config.broker is not None
    assert config.broker.password == "from-env"
    secret = tmp_path / "password"
    secret.write_text("from-file")
    config = build({**MINIMAL, "broker": url}, {"broker": {"password_file": secret}}, password="x")
    assert config.broker is not None
    assert config.broker.password == "from-file"


def test_the_service_keeps_a_persistent_session_with_its_broker() -> None:
    url = {**MINIMAL, "broker": {"url": "mqtt://broker.lan"}}
    config = build(url)
    assert config.broker is not None
    assert config.broker_session == "main"
    assert config.coordinator_config(config.broker).session == "main"
    named = build({**url, "broker": {"url": "mqtt://broker.lan", "session": "fleet-2"}})
    assert named.coordinator_config(config.broker).session == "fleet-2"
    clean = build({**url, "broker": {"url": "mqtt://broker.lan", "session": ""}})
    assert clean.coordinator_config(config.broker).session is None
    # The embedded broker stops with the service: nothing to keep a session in.
    embedded = build(MINIMAL)
    assert embedded.coordinator_config(BrokerConfig("127.0.0.1", 1883, False)).session is None


def test_the_username_defaults_to_coordinator_even_when_built_directly() -> None:
    config = ServiceConfig(
        db=Path("/s.db"),
        trust=TrustConfig(keys=(Path("/k.pub"),)),
        broker=BrokerConfig("localhost", 1883, False),
    )
    assert config.broker is not None
    assert config.broker.username == "coordinator"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False),
     ("10.0.0.5", False), ("coordinator.example.net", False)],
)  # fmt: skip
def test_bind_is_loopback(host: str, loopback: bool) -> None:
    bind = f"[{host}]:8780" if ":" in host else f"{host}:8780"
    config = build(with_("", bind=bind))
    assert config.bind_host == host
    assert config.bind_is_loopback is loopback
    assert config.bind == bind


def test_log_level_is_case_insensitive() -> None:
    assert build(with_("", log_level="DEBUG")).log_level == "debug"


# --------------------------------------------------------------------------- overrides


def test_flags_beat_the_file_and_the_file_beats_the_default() -> None:
    file_values = {**MINIMAL, "bind": "127.0.0.1:9000", "log_level": "warning"}
    config = build(file_values, {"bind": "127.0.0.1:9100", "trust": {"threshold": 1}})
    assert config.bind_port == 9100  # flag
    assert config.log_level == "warning"  # file
    assert config.rollout_tick_s == 1.0  # default


def test_a_broker_flag_replaces_the_file_s_choice_of_broker() -> None:
    file_url = {**MINIMAL, "broker": {"url": "mqtt://broker.example.net"}}
    config = build(file_url, {"broker": {"embedded": True}})
    assert config.embedded_broker
    assert config.broker is None
    config = build(MINIMAL, {"broker": {"url": "mqtt://10.1.2.3:1884"}})
    assert not config.embedded_broker
    assert config.broker_url == "mqtt://10.1.2.3:1884"


def test_trust_flags_replace_the_file_s_keys() -> None:
    config = build(MINIMAL, {"trust": {"keys": [Path("/k/a.pub"), Path("/k/b.pub")]}})
    assert config.trust.keys == (Path("/k/a.pub"), Path("/k/b.pub"))


def test_relative_paths_in_the_file_are_relative_to_its_directory_flags_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    file_values = with_("", artifact_dir="../blobs")
    config = build(file_values, {"trust": {"keys": ["keys/a.pub"]}}, base_dir=Path("/srv/conf"))
    assert config.db == Path("/srv/conf/state.db")
    assert config.artifact_dir == Path("/srv/conf/../blobs")
    assert config.trust.keys == (tmp_path / "keys" / "a.pub",)
    config = build(file_values, {"db": Path("here.db")}, base_dir=Path("/srv/conf"))
    assert config.db == tmp_path / "here.db"
    assert config.db.is_absolute()


def test_store_location_needs_only_the_database() -> None:
    db, artifacts = store_location(
        {"db": "state.db", "artifact_dir": "blobs"}, {}, base_dir=Path("/srv")
    )
    assert (db, artifacts) == (Path("/srv/state.db"), Path("/srv/blobs"))
    db, artifacts = store_location({"db": "state.db"}, {"db": "/x/other.db"}, base_dir=Path("/srv"))
    assert (db, artifacts) == (Path("/x/other.db"), None)
    with pytest.raises(ServiceConfigError, match=r"missing db: pass --db PATH"):
        store_location({}, {}, base_dir=Path("/srv"), override_labels={"db": "--db"})
    with pytest.raises(ServiceConfigError, match="unknown key"):
        store_location({"db": "s.db", "dbb": "x"}, {}, base_dir=Path("/srv"))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("file_values", "expected"),
    [
        (with_("", url="mqtt://x"), "key url (did you mean broker.url? put it under [broker])"),
        (with_("broker", embeded=True), "key broker.embeded (did you mean broker.embedded?)"),
        (with_("", telemetri={}), "unknown key telemetri (did you mean telemetry?)"),
        (with_("trust", db="x"), "unknown key trust.db (did you mean db? move it above the"),
        (with_("api", zzz=1), "unknown key api.zzz (known keys: api.max_body_mib,"),
    ],
)  # fmt: skip
def test_unknown_keys_are_refused_with_a_hint(file_values: dict[str, Any], expected: str) -> None:
    message = error_of(file_values)
    assert message.startswith("coordinator.toml: ")
    assert expected in message


def test_both_brokers_are_refused() -> None:
    message = error_of(with_("broker", url="mqtt://x"))
    assert message.startswith("coordinator.toml: both a broker URL and the embedded broker")
    message = error_of(MINIMAL, {"broker": {"url": "mqtt://x", "embedded": True}})
    assert message.startswith("--embedded-broker: both a broker URL and the embedded broker")


def test_the_anonymous_embedded_broker_needs_dev_mode() -> None:
    # Issue 17: the embedded broker has no password and no ACL; any process on the
    # machine could act as any device or as the coordinator.
    without_dev = {**MINIMAL, "dev": False}
    message = error_of(without_dev)
    assert message.startswith("coordinator.toml: the embedded broker accepts any client")
    assert "configure a broker with credentials" in message
    assert "pass --dev (dev = true)" in message
    flag = error_of({**without_dev, "broker": {}}, {"broker": {"embedded": True}})
    assert flag.startswith("--embedded-broker: the embedded broker accepts any client")
    with pytest.raises(ServiceConfigError) as caught:
        ServiceConfig(db=Path("/s.db"), trust=TrustConfig(keys=(Path("/k.pub"),)),
                      embedded_broker=True)  # fmt: skip
    assert caught.value.key == "broker.embedded"
    # With --dev it runs; a real broker never needs it.
    assert build(without_dev, {"dev": True}).embedded_broker
    assert build({**without_dev, "broker": {"url": "mqtt://h"}}).broker is not None
    assert "dev must be true or false" in error_of({**MINIMAL, "dev": "yes"})


def test_no_broker_is_refused_with_the_ways_to_give_one() -> None:
    message = error_of({**MINIMAL, "broker": {}})
    assert message.startswith("no broker: pass --broker mqtt://HOST:PORT or --embedded-broker")
    assert "embedded = true" in message
    assert error_of({**MINIMAL, "broker": {"embedded": False}}).startswith("no broker")


def test_serving_needs_a_trusted_key() -> None:
    message = error_of({**MINIMAL, "trust": {}})
    assert message.startswith("no trusted keys:")
    assert "--trust KEY.pub" in message
    message = error_of({**MINIMAL, "trust": {"keys": []}})
    assert message.startswith("coordinator.toml: no trusted keys:")


def test_a_missing_db_says_how_to_give_one() -> None:
    message = error_of({key: value for key, value in MINIMAL.items() if key != "db"})
    assert message == "missing db: pass --db PATH or set db in coordinator.toml"


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:0", "bind must be between 1 and 65535, got 0"),
        ("127.0.0.1:70000", "the port must be a number 0-65535"),
        ("::1:8780", "put IPv6 addresses in brackets"),
        ("bad host:80", "is not a host name or IPv4"),
        (8780, "bind must be a string, got an integer"),
    ],
)
def test_a_bad_bind_is_refused(bind: object, expected: str) -> None:
    message = error_of(with_("", bind=bind))
    assert message.startswith("coordinator.toml: ")
    assert expected in message
    flag = error_of(MINIMAL, {"bind": bind})
    assert flag.startswith("--bind: ")


@pytest.mark.parametrize(
    ("file_values", "expected"),
    [
        (with_("api", docs=1), "api.docs must be true or false, got an integer"),
        (with_("api", max_body_mib=True), "api.max_body_mib must be an integer, got a boolean"),
        (with_("api", max_artifact_mib=0), "api.max_artifact_mib must be between 1 and"),
        (with_("api", auth_max_failures=0), "api.auth_max_failures must be >= 1"),
        (with_("api", auth_window_s=0), "api.auth_window_s must be a finite number > 0"),
        (with_("api", auth_lockout_s="1m"), "api.auth_lockout_s must be a number of seconds"),
        (with_("telemetry", flush_s=0), "telemetry.flush_s must be a finite number > 0"),
        (with_("telemetry", retention_rows=1.5), "telemetry.retention_rows must be an integer"),
        (with_("telemetry", retention_days=-1), "telemetry.retention_days must be a number >= 0"),
        (with_("telemetry", drift_windows=0), "telemetry.drift_windows must be >= 1"),
        (with_("rollouts", tick_s="1s"), "rollouts.tick_s must be a number of seconds"),
        (with_("rollouts", min_failed_devices=0), "rollouts.min_failed_devices must be"),
        (with_("runs", upload_budget_mib=-1), "runs.upload_budget_mib must be between 0"),
        (with_("broker", embedded="yes"), "broker.embedded must be true or false, got a string"),
        (with_("broker", embedded_port=0), "broker.embedded_port must be between 1 and 65535"),
        (with_("trust", threshold=2), "trust.threshold 2 is more than the 1 trusted key(s)"),
        (with_("trust", keys="k.pub"), "trust.keys must be an array, got a string"),
        (with_("trust", keys=[""]), "trust.keys[0] must be a non-empty path"),
        (with_("", db=3), "db must be a path string, got an integer"),
        (with_("", log_level="loud"), "log_level must be one of debug, info, warning"),
        ({**MINIMAL, "broker": "mqtt://x"}, "[broker] must be a table, got a string"),
        ({**MINIMAL, "broker": {"url": "http://x"}}, "scheme 'http' unsupported"),
        ({**MINIMAL, "broker": {"url": "mqtt://x", "ca_file": "ca.pem"}}, "use mqtts://"),
        (with_("broker", session="a b"), "broker.session must be 1-64 letters, digits"),
        (with_("broker", session="x" * 65), "broker.session must be 1-64 letters"),
        (with_("broker", session=7), "broker.session must be a string, got an integer"),
    ],
)
def test_wrong_types_and_values_are_refused(file_values: dict[str, Any], expected: str) -> None:
    message = error_of(file_values)
    assert message.startswith("coordinator.toml: "), message
    assert expected in message


def test_an_unreadable_password_file_is_refused(tmp_path: Path) -> None:
    url = {"url": "mqtt://x"}
    message = error_of({**MINIMAL, "broker": {**url, "password_file": str(tmp_path / "nope")}})
    assert message.startswith("coordinator.toml: broker.password_file: ")
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    message = error_of({**MINIMAL, "broker": url}, {"broker": {"password_file": empty}})
    assert message == f"--password-file: broker.password_file: {empty} is empty"


def test_values_are_checked_when_built_directly() -> None:
    trust = TrustConfig(keys=(Path("/k.pub"),))
    with pytest.raises(ServiceConfigError, match="db must be a Path"):
        ServiceConfig(db="s.db", trust=trust, embedded_broker=True)  # type: ignore[arg-type]
    with pytest.raises(ServiceConfigError, match="both a broker URL"):
        ServiceConfig(
            db=Path("/s.db"),
            trust=trust,
            broker=BrokerConfig("h", 1883, False),
            embedded_broker=True,
        )
    config = ServiceConfig(db=Path("/s.db"), trust=trust, embedded_broker=True, dev=True)
    with pytest.raises(ServiceConfigError) as caught:
        dataclasses.replace(config, bind_host="[::1]")
    assert caught.value.key == "bind"


@pytest.mark.parametrize("name", ["", "a/b", "+", "x" * 65, "sp ace"])
def test_a_coordinator_session_name_is_checked(name: str) -> None:
    broker = BrokerConfig("127.0.0.1", 1883, False)
    with pytest.raises(CoordinatorError, match="bad session name"):
        HubConfig(broker=broker, session=name)
    assert HubConfig(broker=broker, session="fedge-coordinator.2").session


def test_the_hub_client_id_is_its_username() -> None:
    # The persistent session is keyed by the username: a broker that binds client
    # ids to usernames (fedge broker config) keeps every device away from it.
    assert hub_client_id("coordinator", "main") == "coordinator"
    assert hub_client_id("coordinator@ops", "main") == "coordinator@ops"
    assert hub_client_id(None, "main") == "coordinator"
    fresh = {hub_client_id("coordinator", None) for _ in range(3)}
    assert len(fresh) == 3  # a clean session gets a new id each time
    assert all(client_id.startswith("coordinator:") for client_id in fresh)
    assert all(not is_valid_device_id(client_id) for client_id in fresh)
