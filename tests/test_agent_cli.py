"""``fedge-agent init`` and ``fedge-agent run``: config file, flags, environment, exit codes.

``run`` is exercised up to the hand-over to ``edge_agent.agent.run_agent``, which is
replaced by a fake that records the configuration it is given.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest

from compress.keys import generate_signing_key, save_keypair
from edge_agent import cli
from edge_agent.cli import build_parser, config_from_args, main
from edge_agent.config.agent import AgentConfig, build_config, example_config, load_config_file
from edge_agent.errors import ConfigError
from tests import agent_crash


@pytest.fixture
def key(tmp_path: Path) -> Path:
    _, public = save_keypair(generate_signing_key(), tmp_path / "keys")
    return public


@pytest.fixture
def config_file(tmp_path: Path, key: Path) -> Path:
    """A complete config file with relative paths (relative to its directory)."""
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    (path.parent / "password").write_text("file-secret\n")
    path.write_text(
        f"""\
device_id = "pi-file"
data_dir = "state"
tags = ["arm64", "camera"]
log_level = "error"

[broker]
url = "mqtt://broker.local"

[trust]
keys = ["{key}"]

[telemetry]
interval_s = 30
"""
    )
    return path


@pytest.fixture
def fake_agent(monkeypatch: pytest.MonkeyPatch) -> list[AgentConfig]:
    """Replace ``run_agent`` (as the CLI sees it) with one that records its config."""
    calls: list[AgentConfig] = []

    def run_agent(config: AgentConfig, **_kwargs: object) -> int:
        calls.append(config)
        return 0

    monkeypatch.setattr(cli, "run_agent", run_agent)
    return calls


@pytest.fixture
def log_levels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the levels ``fedge-agent`` configures logging with (without doing it)."""
    levels: list[int] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    return levels


def args_of(*argv: str | Path) -> Any:
    return build_parser().parse_args(["run", *map(str, argv)])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


# --------------------------------------------------------------------------- init


def test_init_writes_an_example_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    path = tmp_path / "agent.toml"
    assert path.read_text() == example_config()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert "wrote agent.toml" in out
    assert "[trust] keys" in out
    assert "fedge-agent run --config agent.toml" in out
    config = build_config(load_config_file(path), {}, base_dir=tmp_path, file_label=str(path))
    assert config.device_id == "pi-kitchen-01"


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("# my settings\n")
    assert main(["init", str(path)]) == 1
    assert "already exists; pass --force" in error_line(capsys)
    assert path.read_text() == "# my settings\n"
    assert main(["init", str(path), "--force"]) == 0
    assert path.read_text() == example_config()


def test_init_reports_an_unwritable_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path / "no" / "such" / "dir.toml")]) == 1
    assert "cannot write" in error_line(capsys)


# --------------------------------------------------------------------------- config_from_args


def test_flag_beats_file_beats_default(config_file: Path, tmp_path: Path) -> None:
    config = config_from_args(
        args_of("--config", config_file, "--device-id", "pi-flag", "--threshold", "1"), {}
    )
    assert config.device_id == "pi-flag"  # flag beats file
    assert config.broker.username == "pi-flag"
    assert config.telemetry.interval_s == 30.0  # file beats default
    assert config.transfer.window == 16  # default
    assert config.log_level == "error"
    assert config.data_dir == config_file.parent / "state"  # relative to the file
    plain = config_from_args(args_of("--config", config_file), {})
    assert plain.device_id == "pi-file"


def test_every_run_flag_reaches_the_config(
    config_file: Path, tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pw").write_text("flag-secret")
    config = config_from_args(
        args_of(
            "--config", config_file, "--broker", "mqtts://b.example:8884", "--username", "u1",
            "--password-file", "pw", "--ca-file", "ca.pem", "--cert-file", "c.pem",
            "--key-file", "k.pem", "--data-dir", "data", "--http", "127.0.0.1:8080",
            "--runtime", "tflite", "--telemetry-interval", "2.5", "--trust", key,
            "--threshold", "1", "--tag", "gpu",
        ),
        {},
    )  # fmt: skip
    broker = config.broker
    assert (broker.host, broker.port, broker.tls) == ("b.example", 8884, True)
    assert (broker.username, broker.password) == ("u1", "flag-secret")
    assert (broker.ca_file, broker.cert_file, broker.key_file) == (
        tmp_path / "ca.pem",
        tmp_path / "c.pem",
        tmp_path / "k.pem",
    )
    assert config.data_dir == tmp_path / "data"  # flags are relative to the cwd
    assert (config.http, config.runtime, config.telemetry.interval_s) == (
        "127.0.0.1:8080",
        "tflite",
        2.5,
    )
    assert config.trust.keys == (key,)
    assert config.tags == ("gpu",)


def test_repeatable_trust_and_tag_replace_the_file_lists(config_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pub"
    third = tmp_path / "third.pub"
    config = config_from_args(
        args_of(
            "--config", config_file, "--trust", other, "--trust", third, "--threshold", "2",
            "--tag", "a", "--tag", "b", "--tag", "a",
        ),
        {},
    )  # fmt: skip
    assert config.trust.keys == (other, third)
    assert config.trust.threshold == 2
    assert config.tags == ("a", "b")


def test_environment_password_is_the_last_resort(config_file: Path, tmp_path: Path) -> None:
    env = {"FEDGE_AGENT_PASSWORD": "env-secret"}
    assert config_from_args(args_of("--config", config_file), env).broker.password == "env-secret"
    assert config_from_args(args_of("--config", config_file), {}).broker.password is None
    empty = {"FEDGE_AGENT_PASSWORD": ""}
    assert config_from_args(args_of("--config", config_file), empty).broker.password is None
    flagged = args_of("--config", config_file, "--password-file", config_file.parent / "password")
    assert config_from_args(flagged, env).broker.password == "file-secret"
    text = config_file.read_text().replace("[broker]\n", '[broker]\npassword_file = "password"\n')
    config_file.write_text(text)
    assert config_from_args(args_of("--config", config_file), env).broker.password == "file-secret"


def test_default_config_file_is_used_only_when_present(
    config_file: Path, tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(config_file.parent)
    assert config_from_args(args_of(), {}).device_id == "pi-file"
    monkeypatch.chdir(tmp_path)
    flags_only = args_of(
        "--device-id", "pi-9", "--broker", "mqtt://b", "--data-dir", "d", "--trust", key
    )
    config = config_from_args(flags_only, {})
    assert (config.device_id, config.data_dir) == ("pi-9", tmp_path / "d")
    with pytest.raises(ConfigError, match=r"^missing device_id: pass --device-id ID or set "):
        config_from_args(args_of(), {})


def test_config_errors_name_the_flag(config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--broker: invalid broker URL 'http://b'"):
        config_from_args(args_of("--config", config_file, "--broker", "http://b"), {})
    with pytest.raises(ConfigError, match=r"^--telemetry-interval: telemetry\.interval_s"):
        config_from_args(args_of("--config", config_file, "--telemetry-interval", "0"), {})
    config_file.write_text(config_file.read_text() + "\n[transfer]\nwindw = 3\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: unknown key transfer\.windw \(did you"):
        config_from_args(args_of("--config", config_file), {})


# --------------------------------------------------------------------------- run


def test_run_hands_the_config_to_the_agent(
    config_file: Path, fake_agent: list[AgentConfig], log_levels: list[int]
) -> None:
    assert main(["run", "--config", str(config_file), "--device-id", "pi-run"]) == 0
    [config] = fake_agent
    assert config.device_id == "pi-run"
    assert config.tags == ("arm64", "camera")
    assert log_levels == [logging.ERROR]  # the file's log_level


def test_run_returns_the_agent_exit_status(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, log_levels: list[int]
) -> None:
    monkeypatch.setattr(cli, "run_agent", lambda config, **_kwargs: 3)
    assert main(["run", "--config", str(config_file)]) == 3


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["run", "-v"], logging.INFO),
        (["-v", "run"], logging.INFO),
        (["run", "-vv"], logging.DEBUG),
        (["run"], logging.ERROR),
    ],
)
def test_verbosity_overrides_the_config_log_level(
    config_file: Path,
    fake_agent: list[AgentConfig],
    log_levels: list[int],
    argv: list[str],
    level: int,
) -> None:
    assert main([*argv, "--config", str(config_file)]) == 0
    assert log_levels == [level]


def test_run_with_a_missing_config_file_exits_2(
    tmp_path: Path, fake_agent: list[AgentConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such config file" in error_line(capsys)
    assert fake_agent == []


def test_run_with_invalid_toml_names_the_line(
    config_file: Path, fake_agent: list[AgentConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    config_file.write_text('device_id = "x"\ndata_dir = \n')
    assert main(["run", "--config", str(config_file)]) == 2
    assert "line 2" in error_line(capsys)


def test_run_without_trusted_keys_exits_2(
    tmp_path: Path, fake_agent: list[AgentConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--device-id", "pi-1", "--broker", "mqtt://b", "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "--trust KEY.pub" in error_line(capsys)
    assert fake_agent == []


def test_run_checks_key_and_tls_files_before_starting(
    config_file: Path,
    tmp_path: Path,
    fake_agent: list[AgentConfig],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["run", "--config", str(config_file)]
    assert main([*argv, "--trust", str(tmp_path / "gone.pub")]) == 2
    assert "trust.keys: " in (err := error_line(capsys))
    assert "gone.pub: no such key file" in err
    tls = ["--broker", "mqtts://b", "--ca-file", str(tmp_path / "ca.pem")]
    assert main([*argv, *tls]) == 2
    assert "broker.ca_file: " in error_line(capsys)
    assert fake_agent == []


def test_run_refuses_an_http_endpoint_off_loopback(
    config_file: Path, fake_agent: list[AgentConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(config_file), "--http", "0.0.0.0:8080"]) == 2
    assert "loopback" in error_line(capsys)
    assert fake_agent == []


def test_run_refuses_a_runtime_that_is_not_installed(
    config_file: Path,
    fake_agent: list[AgentConfig],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    log_levels: list[int],
) -> None:
    monkeypatch.setattr(cli, "available_runtimes", lambda: frozenset({"onnxruntime"}))
    assert main(["run", "--config", str(config_file), "--runtime", "tflite"]) == 2
    assert "runtime 'tflite' is not installed here (installed: onnxruntime)" in error_line(capsys)
    assert main(["run", "--config", str(config_file), "--runtime", "onnxruntime"]) == 0
    assert fake_agent[0].runtime == "onnxruntime"


def test_crash_checkpoint_kills_only_at_its_point(monkeypatch: pytest.MonkeyPatch) -> None:
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(agent_crash.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    hook = agent_crash.crash_checkpoint("slot-written")
    hook("payload-verified")
    assert kills == []
    hook("slot-written")
    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_the_test_entry_point_hands_its_crash_point_to_the_agent(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, log_levels: list[int]
) -> None:
    hooks: list[Any] = []
    monkeypatch.setattr(cli, "run_agent", lambda _config, checkpoint: hooks.append(checkpoint) or 0)
    kills: list[int] = []
    monkeypatch.setattr(agent_crash.os, "kill", lambda _pid, sig: kills.append(sig))
    assert agent_crash.run(["committed", "run", "--config", str(config_file)]) == 0
    hooks[0]("health-checked")
    hooks[0]("committed")
    assert kills == [signal.SIGKILL]


def test_the_production_agent_takes_no_crash_point_from_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, log_levels: list[int]
) -> None:
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(cli, "run_agent", lambda _config, **kwargs: calls.append(kwargs) or 0)
    monkeypatch.setenv("FEDGE_AGENT_CRASH_AT", "committed")
    assert main(["run", "--config", str(config_file)]) == 0
    assert calls == [{}]  # run_agent's own no-op checkpoint


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # usage error
    out = capsys.readouterr().out
    for command in ("init", "run", "verify"):
        assert command in out
