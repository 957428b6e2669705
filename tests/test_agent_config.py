"""edge_agent.config.agent: typed agent configuration, TOML loading and merging with flags."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from compress.keys import generate_signing_key, save_keypair
from edge_agent.config.agent import (
    MAX_CONFIG_BYTES,
    AgentConfig,
    BrokerConfig,
    TelemetryConfig,
    TransferConfig,
    TrustConfig,
    build_config,
    example_config,
    load_config_file,
    parse_broker_url,
)
from edge_agent.config.agent_schema import AGENT_SCHEMA
from edge_agent.errors import ConfigError


def make_key(directory: Path) -> Path:
    """A fresh public key file in ``directory``."""
    _, public = save_keypair(generate_signing_key(), directory)
    return public


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return make_key(tmp_path / "keys")


def minimal(**extra: Any) -> dict[str, Any]:
    """The smallest valid file contents (key paths are not read by build_config)."""
    values: dict[str, Any] = {
        "device_id": "pi-1",
        "data_dir": "/var/lib/fedge-agent",
        "broker": {"url": "mqtt://localhost"},
        "trust": {"keys": ["/etc/fedge-agent/release.pub"]},
    }
    for name, value in extra.items():
        if isinstance(value, dict):
            values[name] = {**values.get(name, {}), **value}
        else:
            values[name] = value
    return values


def agent(**fields: Any) -> AgentConfig:
    defaults: dict[str, Any] = {
        "device_id": "pi-1",
        "broker": BrokerConfig("localhost", 1883, False),
        "data_dir": Path("/data"),
        "trust": TrustConfig((Path("/k.pub"),)),
    }
    return AgentConfig(**{**defaults, **fields})


def build(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> AgentConfig:
    return build_config(
        values, overrides or {}, base_dir=Path("/etc/fedge-agent"), file_label="agent.toml"
    )


# --------------------------------------------------------------------------- broker URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://localhost", ("localhost", 1883, False)),
        ("mqtts://broker.example.net", ("broker.example.net", 8883, True)),
        ("mqtt://10.0.0.2:1884", ("10.0.0.2", 1884, False)),
        ("mqtts://broker:443/", ("broker", 443, True)),
        ("mqtt://[::1]", ("::1", 1883, False)),
        ("mqtts://[fe80::1]:9000", ("fe80::1", 9000, True)),
        ("MQTTS://Broker", ("Broker", 8883, True)),
        ("mqtt://my_broker:65535", ("my_broker", 65535, False)),
    ],
)
def test_parse_broker_url_accepts(url: str, expected: tuple[str, int, bool]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://broker", "scheme 'http' unsupported"),
        ("ws://broker:9001", "scheme 'ws' unsupported"),
        ("broker:1883", "want mqtt://"),
        ("mqtt://", "no host"),
        ("mqtt://user:secret@broker", "credentials do not belong"),
        ("mqtt://broker/fedge", "no path"),
        ("mqtt://broker?x=1", "no path, query"),
        ("mqtt://broker:0", "port '0'"),
        ("mqtt://broker:65536", "port '65536'"),
        ("mqtt://broker:http", "port 'http'"),
        ("mqtt://broker:", "port ''"),
        ("mqtt://broker:+1", "port '+1'"),
        ("mqtt://::1", "IPv6 address goes in brackets"),
        ("mqtt://[::1", "unclosed"),
        ("mqtt://[nothost]:1", "not an IPv6 address"),
        ("mqtt://[::1]x", "after ']'"),
        ("mqtt://bro ker", "whitespace"),
        ("mqtt://-broker", "not a host name"),
    ],
)
def test_parse_broker_url_rejects_with_the_url(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker_url(url)
    assert repr(url) in str(info.value)
    assert reason in str(info.value)


def test_parse_broker_url_rejects_non_strings() -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        parse_broker_url(1883)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- BrokerConfig


def test_broker_from_url_and_url_round_trip() -> None:
    broker = BrokerConfig.from_url(
        "mqtts://[::1]", username="pi-1", password="s3cret", ca_file=Path("/ca.pem")
    )
    assert (broker.host, broker.port, broker.tls) == ("::1", 8883, True)
    assert (broker.username, broker.password, broker.ca_file) == ("pi-1", "s3cret", Path("/ca.pem"))
    assert broker.url == "mqtts://[::1]:8883"
    assert parse_broker_url(broker.url) == ("::1", 8883, True)
    assert BrokerConfig.from_url("mqtt://b").url == "mqtt://b:1883"
    assert broker.keepalive_s == 30
    assert (broker.reconnect_min_s, broker.reconnect_max_s) == (1.0, 60.0)


def test_broker_never_shows_the_password() -> None:
    broker = BrokerConfig.from_url("mqtt://b", username="u", password="s3cret")
    assert "s3cret" not in repr(broker)
    assert "s3cret" not in broker.url
    assert "s3cret" not in repr(agent(broker=broker))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"port": 0}, "broker.port must be between 1 and 65535"),
        ({"port": True}, "broker.port must be an integer, got a boolean"),
        ({"host": ""}, "broker.host must not be empty"),
        ({"host": "a b"}, "broker.host is invalid"),
        ({"tls": 1}, "broker.tls must be a boolean"),
        ({"username": ""}, "broker.username must not be empty"),
        ({"password": 5}, "broker.password must be a string"),
        ({"ca_file": Path("/ca.pem")}, "broker.ca_file is set but the broker URL is mqtt://"),
        ({"cert_file": Path("/c.pem")}, "broker.cert_file is set but the broker URL is mqtt://"),
        ({"tls": True, "key_file": Path("/k")}, "key_file is set without broker.cert_file"),
        ({"tls": True, "ca_file": "/ca.pem"}, "broker.ca_file must be a Path"),
        ({"keepalive_s": 0}, "broker.keepalive_s must be between 1 and 65535"),
        ({"reconnect_min_s": 0}, "broker.reconnect_min_s must be a finite number > 0"),
        ({"reconnect_max_s": float("inf")}, "broker.reconnect_max_s must be a finite"),
        ({"reconnect_min_s": 10, "reconnect_max_s": 5}, "reconnect_max_s (5) is less than"),
    ],
)
def test_broker_config_validates(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"host": "b", "port": 1883, "tls": False}
    with pytest.raises(ConfigError) as info:
        BrokerConfig(**{**base, **fields})
    assert message in str(info.value)


def test_broker_accepts_mutual_tls_and_integer_seconds() -> None:
    broker = BrokerConfig(
        "b", 8883, True, cert_file=Path("/c.pem"), key_file=Path("/k.pem"), reconnect_min_s=2
    )
    assert broker.reconnect_min_s == 2.0
    assert isinstance(broker.reconnect_min_s, float)
    assert BrokerConfig("b", 8883, True, cert_file=Path("/both.pem")).key_file is None


def test_broker_check_files(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("ca")
    BrokerConfig("b", 8883, True, ca_file=tmp_path / "ca.pem").check_files()
    BrokerConfig("b", 8883, True).check_files()
    missing = BrokerConfig("b", 8883, True, cert_file=tmp_path / "client.pem")
    with pytest.raises(ConfigError, match=r"broker\.cert_file: .*client\.pem: no such cert file"):
        missing.check_files()
    directory = BrokerConfig("b", 8883, True, ca_file=tmp_path)
    with pytest.raises(ConfigError, match=r"broker\.ca_file: .* is a directory"):
        directory.check_files()


# --------------------------------------------------------------------------- TrustConfig


def test_trust_load_reads_the_keys(tmp_path: Path) -> None:
    first, second = make_key(tmp_path / "a"), make_key(tmp_path / "b")
    trusted = TrustConfig((first, second), threshold=2).load()
    assert trusted.threshold == 2
    assert len({k.key_id for k in trusted.keys}) == 2


@pytest.mark.parametrize(
    ("keys", "threshold", "message"),
    [
        ((Path("/a"),), 2, "trust.threshold 2 is more than the 1 trusted key(s)"),
        ((Path("/a"),), 0, "trust.threshold must be >= 1, got 0"),
        ((Path("/a"),), True, "trust.threshold must be an integer, got a boolean"),
        ((Path("/a"), Path("/a")), 1, "trust.keys lists /a twice"),
        ([Path("/a")], 1, "trust.keys must be a tuple of Paths"),
        (("/a",), 1, "trust.keys must be a tuple of Paths"),
    ],
)
def test_trust_config_validates(keys: Any, threshold: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrustConfig(keys, threshold)
    assert message in str(info.value)


def test_trust_load_names_the_bad_file(tmp_path: Path, key: Path) -> None:
    with pytest.raises(ConfigError, match=r"trust\.keys: .*nope\.pub: no such key file"):
        TrustConfig((tmp_path / "nope.pub",)).load()
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ConfigError, match=r"trust\.keys: .*junk\.pub: not a PEM public key"):
        TrustConfig((tmp_path / "junk.pub",)).load()
    (tmp_path / "copy.pub").write_bytes(key.read_bytes())
    with pytest.raises(ConfigError, match=r"signing\.pub and .*copy\.pub hold the same key"):
        TrustConfig((key, tmp_path / "copy.pub")).load()
    with pytest.raises(ConfigError, match="no trusted keys"):
        TrustConfig().load()


# --------------------------------------------------------------------------- small sections


def test_telemetry_and_transfer_defaults() -> None:
    assert TelemetryConfig() == TelemetryConfig(10.0, 1024 * 1024)
    assert TransferConfig() == TransferConfig(16, 5.0)
    assert isinstance(TelemetryConfig(interval_s=3).interval_s, float)
    assert TransferConfig(window=1024).window == 1024


@pytest.mark.parametrize(
    ("kind", "fields", "message"),
    [
        (TelemetryConfig, {"interval_s": 0}, "telemetry.interval_s must be a finite number > 0"),
        (TelemetryConfig, {"interval_s": float("nan")}, "telemetry.interval_s must be a finite"),
        (TelemetryConfig, {"interval_s": True}, "telemetry.interval_s must be a number"),
        (TelemetryConfig, {"spool_max_bytes": 4095}, "telemetry.spool_max_bytes must be >= 4096"),
        (TransferConfig, {"window": 0}, "transfer.window must be between 1 and 1024"),
        (TransferConfig, {"window": 1025}, "transfer.window must be between 1 and 1024"),
        (TransferConfig, {"window": 16.0}, "transfer.window must be an integer, got a float"),
        (TransferConfig, {"stall_timeout_s": -1}, "transfer.stall_timeout_s must be a finite"),
    ],
)
def test_telemetry_and_transfer_ranges(kind: Any, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        kind(**fields)
    assert message in str(info.value)


# --------------------------------------------------------------------------- AgentConfig


def test_agent_config_defaults_the_username_to_the_device_id() -> None:
    config = agent()
    assert config.broker.username == "pi-1"
    assert config.telemetry == TelemetryConfig()
    assert config.transfer == TransferConfig()
    assert (config.tags, config.runtime, config.http, config.log_level) == ((), None, None, "info")
    named = agent(broker=BrokerConfig("localhost", 1883, False, username="other"))
    assert named.broker.username == "other"


def test_agent_config_is_frozen() -> None:
    config = agent()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device_id = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.broker.port = 1  # type: ignore[misc]


def test_agent_config_refuses_no_trusted_keys_and_says_how_to_add_one() -> None:
    with pytest.raises(ConfigError) as info:
        agent(trust=TrustConfig())
    assert "no trusted keys" in str(info.value)
    assert "--trust KEY.pub" in str(info.value)


def test_agent_config_tags_are_deduplicated_in_order() -> None:
    assert agent(tags=("camera", "arm64", "camera", "gpu:none")).tags == (
        "camera",
        "arm64",
        "gpu:none",
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device_id": "coordinator"}, "device_id: device id 'coordinator' is reserved"),
        ({"device_id": "has space"}, "device_id: invalid device id 'has space'"),
        ({"device_id": 7}, "device_id: device id must be a str"),
        ({"tags": ("ok", "-bad")}, "tags: invalid tag '-bad'"),
        ({"tags": ("ok", 3)}, "tags must hold strings, got an integer"),
        ({"tags": "arm64"}, "tags must be an array of strings"),
        ({"runtime": "tensorrt"}, "runtime must be one of onnxruntime, tflite, got 'tensorrt'"),
        ({"runtime": 1}, "runtime must be one of onnxruntime, tflite, got an integer"),
        ({"http": "8080"}, "http must be HOST:PORT such as 127.0.0.1:8080, got '8080'"),
        ({"http": "127.0.0.1:99999"}, "http must be HOST:PORT"),
        ({"http": ":8080"}, "no host"),
        ({"log_level": "verbose"}, "log_level must be one of debug, info, warning"),
        ({"data_dir": "/data"}, "data_dir must be a Path, got a string"),
        ({"broker": "mqtt://b"}, "broker must be a BrokerConfig"),
    ],
)
def test_agent_config_validates(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        agent(**fields)
    assert message in str(info.value)


def test_agent_config_accepts_http_shapes_and_normalizes_log_level() -> None:
    for bind in ("127.0.0.1:8080", "localhost:1", "[::1]:8080", "0.0.0.0:80"):
        assert agent(http=bind).http == bind
    assert agent(log_level="DEBUG").log_level == "debug"
    assert agent(runtime="tflite").runtime == "tflite"


# --------------------------------------------------------------------------- files


def test_load_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\n[broker]\nurl = "mqtt://b"\n')
    assert load_config_file(path) == {"device_id": "pi-1", "broker": {"url": "mqtt://b"}}


def test_load_config_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: no such config file"):
        load_config_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config_file(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "pi-1"\n\ndata_dir = /var/lib\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 3"):
        load_config_file(bad)
    bad.write_bytes(b'device_id = "\xff"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: not UTF-8"):
        load_config_file(bad)
    bad.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=r"bad\.toml: .*too large for a config file"):
        load_config_file(bad)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_load_config_file_refuses_a_pipe(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config_file(tmp_path / "pipe")


# --------------------------------------------------------------------------- the example


def test_example_config_loads_and_validates(tmp_path: Path, key: Path) -> None:
    text = example_config().replace("/etc/fedge-agent/keys/release.pub", str(key))
    assert text != example_config()
    path = tmp_path / "agent.toml"
    path.write_text(text)
    config = build_config(load_config_file(path), {}, base_dir=tmp_path, file_label=str(path))
    assert config.device_id == "pi-kitchen-01"
    assert config.broker.url == "mqtts://broker.example.net:8883"
    assert config.broker.username == "pi-kitchen-01"
    assert config.trust.keys == (key,)
    assert config.trust.load().threshold == 1
    assert config.tags == ()  # commented out: a device claims no tags by accident
    assert config.runtime is None


def test_example_config_states_the_real_defaults() -> None:
    example = build_config(
        tomllib.loads(example_config()), {}, base_dir=Path("/"), file_label="example"
    )
    bare = build_config(minimal(), {}, base_dir=Path("/"))
    assert example.telemetry == bare.telemetry
    assert example.transfer == bare.transfer
    assert example.trust.threshold == bare.trust.threshold
    assert example.log_level == bare.log_level
    assert example.broker.username == example.device_id
    for name in ("keepalive_s", "reconnect_min_s", "reconnect_max_s"):
        assert getattr(example.broker, name) == getattr(bare.broker, name)


def test_example_config_mentions_every_key_with_a_comment() -> None:
    lines = example_config().splitlines()
    for dotted in AGENT_SCHEMA.keys:
        key = dotted.rpartition(".")[2]
        at = next(i for i, line in enumerate(lines) if re.match(rf"#? ?{key} = ", line))
        start = at
        while start > 0 and lines[start - 1].strip() and not lines[start - 1].startswith("["):
            start -= 1  # to the first line of the key's paragraph
        assert start < at, f"{key} has no comment above it"
        assert re.match(r"# [A-Z]", lines[start]), f"{key}'s paragraph starts with {lines[start]}"


# --------------------------------------------------------------------------- build_config


def test_build_config_flag_beats_file_beats_default() -> None:
    config = build(
        minimal(device_id="from-file", telemetry={"interval_s": 30}, transfer={"window": 8}),
        {"device_id": "from-flag", "transfer": {"window": 4}},
    )
    assert config.device_id == "from-flag"
    assert config.transfer.window == 4
    assert config.telemetry.interval_s == 30.0
    assert config.telemetry.spool_max_bytes == 1024 * 1024
    assert config.broker.username == "from-flag"


def test_build_config_list_overrides_replace_the_file_lists() -> None:
    config = build(
        minimal(tags=["a", "b"], trust={"keys": ["/k1.pub", "/k2.pub"]}),
        {"tags": ["c"], "trust": {"keys": [Path("/k3.pub")]}},
    )
    assert config.tags == ("c",)
    assert config.trust.keys == (Path("/k3.pub"),)


def test_build_config_resolves_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = build(
        minimal(data_dir="state", trust={"keys": ["keys/a.pub", "/abs/b.pub"]}),
        {"broker": {"url": "mqtts://b", "ca_file": Path("certs/ca.pem")}},
    )
    assert config.data_dir == Path("/etc/fedge-agent/state")
    assert config.trust.keys == (Path("/etc/fedge-agent/keys/a.pub"), Path("/abs/b.pub"))
    assert config.broker.ca_file == tmp_path / "certs/ca.pem"
    assert config.broker.ca_file.is_absolute()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"devce_id": "x"}, "agent.toml: unknown key devce_id (did you mean device_id?)"),
        ({"url": "mqtt://b"}, "unknown key url (did you mean broker.url? put it under [broker])"),
        (
            {"broker": {"usrname": "u"}},
            "unknown key broker.usrname (did you mean broker.username?)",
        ),
        ({"trust": {"key": ["/a"]}}, "unknown key trust.key (did you mean trust.keys?)"),
        (
            {"broker": {"device_id": "x"}},
            "unknown key broker.device_id (did you mean device_id? move it above the first",
        ),
        ({"zzz": 1}, "unknown key zzz (known keys: device_id, data_dir"),
        ({"broker": "mqtt://b"}, "agent.toml: [broker] must be a table, got a string"),
    ],
)
def test_build_config_rejects_unknown_keys_with_a_hint(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build({**minimal(), **values})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"transfer": {"window": True}}, "agent.toml: transfer.window must be an integer, got a b"),
        ({"transfer": {"window": 16.0}}, "agent.toml: transfer.window must be an integer, got a f"),
        ({"trust": {"threshold": "1"}}, "agent.toml: trust.threshold must be an integer, got a s"),
        ({"telemetry": {"interval_s": "10"}}, "telemetry.interval_s must be a number of seconds"),
        ({"broker": {"keepalive_s": 30.5}}, "agent.toml: broker.keepalive_s must be an integer"),
        ({"data_dir": 5}, "agent.toml: data_dir must be a path string, got an integer"),
        ({"data_dir": ""}, "agent.toml: data_dir must be a non-empty path"),
        ({"data_dir": "a\x00b"}, "agent.toml: data_dir must be a non-empty path"),
        ({"trust": {"keys": "/k.pub"}}, "agent.toml: trust.keys must be an array, got a string"),
        ({"trust": {"keys": [1]}}, "agent.toml: trust.keys[0] must be a path string"),
        ({"tags": "arm64"}, "agent.toml: tags must be an array, got a string"),
        ({"device_id": 12}, "agent.toml: device_id: device id must be a str"),
        ({"broker": {"url": "http://b"}}, "agent.toml: invalid broker URL 'http://b'"),
        ({"broker": {"url": "mqtt://b", "ca_file": "/ca"}}, "agent.toml: broker.ca_file is set"),
        ({"log_level": "loud"}, "agent.toml: log_level must be one of"),
    ],
)
def test_build_config_checks_types_strictly(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(minimal(**values))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_build_config_names_the_flag_a_bad_value_came_from() -> None:
    with pytest.raises(ConfigError, match=r"^--broker: invalid broker URL 'mqtt://b/x'"):
        build_config(
            minimal(),
            {"broker": {"url": "mqtt://b/x"}},
            base_dir=Path("/"),
            override_labels={"broker.url": "--broker"},
        )
    with pytest.raises(ConfigError, match=r"^override: trust.threshold 3 is more than"):
        build(minimal(), {"trust": {"threshold": 3}})
    with pytest.raises(ConfigError, match=r"^--frob: unknown key frob"):
        build_config(minimal(), {"frob": 1}, base_dir=Path("/"), override_labels={"frob": "--frob"})


def test_build_config_missing_required_keys_say_where_to_set_them() -> None:
    for key in ("device_id", "data_dir"):
        values = minimal()
        del values[key]
        with pytest.raises(ConfigError, match=f"^missing {key}: set {key} in agent.toml$"):
            build(values)
    flags = {"device_id": "pi-1", "data_dir": "/d"}
    with pytest.raises(
        ConfigError,
        match=r"^missing broker\.url: pass --broker URL or set broker\.url in a config file \(--",
    ):
        build_config({}, flags, base_dir=Path("/"), override_labels={"broker.url": "--broker"})


def test_build_config_without_trusted_keys_says_how_to_add_one() -> None:
    values = minimal()
    del values["trust"]
    with pytest.raises(ConfigError, match=r"no trusted keys: .*pass --trust KEY\.pub"):
        build(values)


def test_build_config_reads_and_strips_the_password_file(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("  s3cret\n")
    config = build_config(minimal(broker={"password_file": "password"}), {}, base_dir=tmp_path)
    assert config.broker.password == "s3cret"
    assert build(minimal(broker={"password": "inline"})).broker.password == "inline"
    assert build(minimal()).broker.password is None


def test_build_config_password_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"^agent.toml: broker.password_file: .*empty is empty"):
        build_config(
            minimal(broker={"password_file": "empty"}),
            {},
            base_dir=tmp_path,
            file_label="agent.toml",
        )
    with pytest.raises(ConfigError, match=r"broker.password_file: .*nope: no such password file"):
        build_config(minimal(broker={"password_file": "nope"}), {}, base_dir=tmp_path)
    with pytest.raises(
        ConfigError, match=r"give broker\.password or broker\.password_file, not both"
    ):
        build(minimal(broker={"password": "a", "password_file": "/p"}))


def test_build_config_password_override_replaces_the_file_source(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("from-flag-file")
    config = build(
        minimal(broker={"password": "from-file"}),
        {"broker": {"password_file": tmp_path / "password"}},
    )
    assert config.broker.password == "from-flag-file"
    config = build(
        minimal(broker={"password_file": "/does/not/exist"}),
        {"broker": {"password": "from-env"}},
    )
    assert config.broker.password == "from-env"


def test_build_config_warns_when_username_is_not_the_device_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.config.agent"):
        config = build(minimal(broker={"username": "someone-else"}))
    assert config.broker.username == "someone-else"
    assert "differs from device_id" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge_agent.config.agent"):
        build(minimal(broker={"username": "pi-1"}))
    assert caplog.text == ""
