"""edge_agent.config.schema: one schema per config file, and what is derived from it.

The agent's (``AGENT_SCHEMA``) and the coordinator service's (``SERVICE_SCHEMA``)
config files are each declared once; these tests hold the derived artefacts to the
schema: the example files shipped as package data, the keys the parser accepts, the
command lines' flags, the dataclasses' defaults.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main

from coordinator.cli.config_flags import config_options, parameter_name
from coordinator.cli.service import app as service_app
from coordinator.service.config import ServiceConfig, TelemetryStorage
from coordinator.service.config_reader import build_service_config, example_service_config
from coordinator.service.config_schema import SERVICE_SCHEMA
from edge_agent.cli import build_parser
from edge_agent.config import schema as schema_module
from edge_agent.config.agent import (
    AgentConfig,
    BrokerConfig,
    TrustConfig,
    build_config,
    example_config,
)
from edge_agent.config.agent_schema import AGENT_SCHEMA
from edge_agent.config.schema import Key, Schema, Section, toml_value
from edge_agent.config.values import FieldError
from edge_agent.errors import ConfigError

SCHEMAS = {
    "edge_agent.config.agent_schema:AGENT_SCHEMA": AGENT_SCHEMA,
    "coordinator.service.config_schema:SERVICE_SCHEMA": SERVICE_SCHEMA,
}


def uncommented(text: str) -> str:
    """An example file with every commented-out ``# key = value`` line made active."""
    return re.sub(r"^# ([a-z_]+ = )", r"\1", text, flags=re.MULTILINE)


def dotted_keys(values: dict[str, Any]) -> set[str]:
    return {
        f"{name}.{sub}" if isinstance(value, dict) else name
        for name, value in values.items()
        for sub in (value if isinstance(value, dict) else [None])
    }


# --------------------------------------------------------------------------- the example files


@pytest.mark.parametrize("reference", SCHEMAS)
def test_the_shipped_example_is_generated_from_the_schema(reference: str) -> None:
    schema = SCHEMAS[reference]
    assert schema.example_path().read_text("utf-8") == schema.render_example(), (
        f"stale; run: python -m edge_agent.config.schema --write {reference}"
    )
    assert schema.example_text() == schema.render_example()
    assert schema_module.main(["--check", reference]) == 0


@pytest.mark.parametrize("schema", SCHEMAS.values())
def test_every_key_is_in_exactly_one_place(schema: Schema) -> None:
    """The keys the parser accepts == the keys in the schema == the keys in the example."""
    example = tomllib.loads(uncommented(schema.render_example()))
    assert dotted_keys(example) == set(schema.keys)
    sources = schema.merge(example, {}, base_dir=Path("/etc/fedge"))
    assert set(sources.values) == set(schema.keys)
    with pytest.raises(ConfigError, match="unknown key nope"):
        schema.merge({"nope": 1}, {}, base_dir=Path("/"))


@pytest.mark.parametrize("schema", SCHEMAS.values())
def test_every_key_of_the_example_has_its_own_commented_paragraph(schema: Schema) -> None:
    lines = schema.render_example().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"(# )?[a-z_]+ = ", line):
            assert lines[index - 1].startswith("# "), line
    assert all(len(line) <= schema_module.WIDTH for line in lines if line.startswith("# "))


def test_the_agent_example_loads_back_to_the_expected_config() -> None:
    config = build_config(tomllib.loads(example_config()), {}, base_dir=Path("/"))
    assert config == AgentConfig(
        device_id="pi-kitchen-01",
        broker=BrokerConfig("broker.example.net", 8883, True),
        data_dir=Path("/var/lib/fedge-agent"),
        trust=TrustConfig((Path("/etc/fedge-agent/keys/release.pub"),)),
    )


def test_the_service_example_loads_back_to_the_expected_config() -> None:
    values = tomllib.loads(example_service_config())
    config = build_service_config(values, {}, base_dir=Path("/srv/fedge"))
    assert config == ServiceConfig(
        db=Path("/srv/fedge/state.db"),
        trust=TrustConfig((Path("/srv/fedge/keys/signing.pub"),)),
        broker=BrokerConfig.from_url("mqtts://broker.example.net:8883", username="coordinator"),
    )
    assert config.telemetry == TelemetryStorage()


def test_the_examples_uncommented_load_too(tmp_path: Path) -> None:
    """Every example value is a valid one (the password pair is one or the other)."""
    text = uncommented(example_config()).replace('password_file = "/etc/fedge-agent/password"', "")
    text = text.replace('http_token_file = "/etc/fedge-agent/http-token"', "")  # not there
    agent = build_config(tomllib.loads(text), {}, base_dir=tmp_path)
    assert agent.tags == ("arm64", "camera")
    assert agent.broker.key_file == Path("/etc/fedge-agent/client.key")
    assert agent.broker.password == "change-me"
    assert agent.http_allowed_hosts == ("pi-kitchen-01.lan",)
    text = uncommented(example_service_config()).replace("embedded = true\n", "")
    text = text.replace('password_file = "/etc/fedge/password"', "")
    service = build_service_config(tomllib.loads(text), {}, base_dir=tmp_path)
    assert service.broker is not None
    assert service.broker.url == "mqtts://broker.example.net:8883"


# --------------------------------------------------------------------------- flags


def test_the_agent_run_flags_are_the_schema_s() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    run = commands.choices["run"]  # type: ignore[index]
    options = {o for a in run._actions for o in a.option_strings if o.startswith("--")}
    assert options - {"--help", "--verbose", "--config"} == set(AGENT_SCHEMA.flags().values())


def test_the_service_serve_flags_are_the_schema_s() -> None:
    command = typer.main.get_command(service_app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    params = {o: p for p in serve.params for o in p.opts if o.startswith("--")}
    by_flag = {key.flag: key for key in SERVICE_SCHEMA.keys.values() if key.flag}
    assert set(params) - {"--help", "--config"} == set(by_flag)
    for flag, key in by_flag.items():
        param = params[flag]
        assert isinstance(param, click.Option)
        assert param.help == key.flag_help()
        assert param.metavar == (key.metavar or None)
        assert param.multiple is key.repeatable
        assert param.is_flag is (key.flag_type() is bool)
        assert param.default is (False if param.is_flag else None)


def test_a_key_s_flag_is_declared_from_its_schema_entry() -> None:
    keys = {k.flag: k for k in SMALL.keys.values() if k.flag} | {
        "--dir": Key("dir", "A dir.", read="path", flag="--dir", metavar="DIR"),
        "--files": Key("files", "Files. More.", read="paths", default=(), flag="--files"),
        "--rate": Key("rate", "A rate.", default=0.5, flag="--rate", metavar="R"),
    }
    declared = {name: (hint, default) for name, hint, default in config_options(
        Schema("T.", (Section("", tuple(keys.values())),), example_package="x", example_name="x")
    )}  # fmt: skip
    assert set(declared) == {"name", "local", "dir", "files", "rate"}
    assert declared["local"][1] is False  # a switch
    assert {name: hint.__origin__ for name, (hint, _) in declared.items()} == {
        "name": str | None, "local": bool, "dir": Path | None,
        "files": list[Path] | None, "rate": float | None,
    }  # fmt: skip
    options = {name: hint.__metadata__[0] for name, (hint, _) in declared.items()}
    assert options["files"].help == "Files. Default: none. Repeatable; replaces the file's list."
    assert options["dir"].file_okay is False
    assert options["files"].dir_okay is False
    assert parameter_name("--embedded-broker-port") == "embedded_broker_port"


def test_a_switch_that_is_on_by_default_has_no_flag() -> None:
    on = Key("on", "On.", default=True, flag="--on")
    schema = Schema("T.", (Section("", (on,)),), example_package="x", example_name="x")
    with pytest.raises(TypeError, match="on by default"):
        config_options(schema)


# --------------------------------------------------------------------------- the machinery

SMALL = Schema(
    title="A test file.",
    sections=(
        Section(
            "",
            (Key("name", "Its name.", example="n1", required=True, flag="--name", metavar="N"),),
        ),
        Section(
            "net",
            (
                Key("url", "Where.", example="mqtt://x", commented=True),
                Key("local", "Or local.", default=False, flag="--local"),
                Key("port", "Its port.", default=1883),
                Key("dir", "A directory.", example="data", read="path", default_doc="here"),
                Key("files", "Some files.", read="paths", default=(), default_doc=""),
            ),
            help="The network.",
        ),
    ),
    example_package="edge_agent.config",
    example_name="small.example.toml",
    replace_together=(("net.url", "net.local"),),
)


def test_render_example() -> None:
    assert SMALL.render_example() == (
        "# A test file.\n"
        "\n"
        "# Its name. Required.\n"
        'name = "n1"\n'
        "\n"
        "[net]\n"
        "# The network.\n"
        "\n"
        "# Where. Default: none.\n"
        '# url = "mqtt://x"\n'
        "\n"
        "# Or local. Default: false.\n"
        "local = false\n"
        "\n"
        "# Its port. Default: 1883.\n"
        "port = 1883\n"
        "\n"
        "# A directory. Default: here.\n"
        'dir = "data"\n'
        "\n"
        "# Some files.\n"
        "files = []\n"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (3, "3"),
        (1.0, "1"),
        (0.25, "0.25"),
        ('a "b" \\', '"a \\"b\\" \\\\"'),
        (Path("/x"), '"/x"'),
        (("a", 1), '["a", 1]'),
    ],
)
def test_toml_value(value: object, text: str) -> None:
    assert toml_value(value) == text
    assert tomllib.loads(f"v = {text}")["v"] == (
        list(value)
        if isinstance(value, tuple)
        else str(value)
        if isinstance(value, Path)
        else value
    )


def test_toml_value_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="no TOML form for dict"):
        toml_value({})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nme": "x"}, "f: unknown key nme (did you mean name?)"),
        ({"port": 1}, "f: unknown key port (did you mean net.port? put it under [net])"),
        ({"net": {"name": "x"}}, "(did you mean name? move it above the first [section] header)"),
        ({"net": {"zzz": 1}}, "(known keys: net.url, net.local, net.port, net.dir, net.files)"),
        ({"zzz": 1}, "unknown key zzz (known keys: name, net)"),
        ({"net": 1}, "f: [net] must be a table, got an integer"),
        ({"net": {"dir": 3}}, "f: net.dir must be a path string, got an integer"),
        ({"net": {"files": ["a", ""]}}, "f: net.files[1] must be a non-empty path"),
    ],
)
def test_merge_refuses_bad_sources(values: dict[str, Any], message: str) -> None:
    with pytest.raises(FieldError) as caught:
        SMALL.merge(values, {}, base_dir=Path("/"), file_label="f")
    assert message in str(caught.value)


def test_merge_flags_beat_the_file_and_replace_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sources = SMALL.merge(
        {"name": "file", "net": {"url": "mqtt://f", "port": 2, "dir": "d"}},
        {"name": "flag", "net": {"local": True, "files": ["k"]}},
        base_dir=Path("/etc"),
        file_label="f.toml",
        override_labels={"name": "--name"},
    )
    assert sources.get("name") == "flag"
    assert "net.url" not in sources  # the flag chose local instead
    assert sources.get("net.url") is None
    assert sources.get("net.port") == 2
    assert sources.get("net.dir") == Path("/etc/d")
    assert sources.get("net.files") == (tmp_path / "k",)
    assert sources.where("name") == "--name: "
    assert sources.where("net.files[0]") == "override: "
    assert sources.where("net.port") == "f.toml: "
    assert sources.where("net.url") == ""
    assert sources.section("net", skip=("port",)) == {
        "dir": Path("/etc/d"),
        "local": True,
        "files": (tmp_path / "k",),
    }


def test_require_says_how_to_give_a_key() -> None:
    bare = SMALL.merge({}, {}, base_dir=Path("/"))
    with pytest.raises(FieldError, match=r"^missing name: set name in a config file \(--config\)$"):
        bare.require("name")
    flagged = SMALL.merge({}, {}, base_dir=Path("/"), file_label="f", override_labels=SMALL.flags())
    with pytest.raises(FieldError, match=r"^missing name: pass --name N or set name in f$"):
        flagged.require("name")
    assert SMALL.flags() == {"name": "--name", "net.local": "--local"}
    assert SMALL.default("net.port") == 1883


def test_main_writes_and_checks_example_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "small.example.toml"
    monkeypatch.setattr(Schema, "example_path", lambda _self: target)
    monkeypatch.setattr(schema_module, "SMALL", SMALL, raising=False)
    reference = "edge_agent.config.schema:SMALL"
    assert schema_module.main(["--check", reference]) == 1
    assert "stale:" in capsys.readouterr().out
    assert schema_module.main(["--write", reference]) == 0
    assert target.read_text() == SMALL.render_example()
    assert schema_module.main(["--check", reference]) == 0


def test_a_key_s_summary_is_its_first_sentence_and_default() -> None:
    key = Key("id", "Its name: A-Z _ . - (no dots at 1.5). More text. Even more.", default=3)
    assert key.summary() == "Its name: A-Z _ . - (no dots at 1.5). Default: 3."
    assert Key("x", "Needed.", required=True).summary() == "Needed. Required."


def test_the_agent_run_flags_take_the_schema_s_types() -> None:
    args = build_parser().parse_args(
        ["run", "--threshold", "2", "--telemetry-interval", "2.5", "--trust", "a.pub",
         "--trust", "b.pub", "--tag", "x", "--data-dir", "d"]
    )  # fmt: skip
    assert (args.threshold, args.telemetry_interval) == (2, 2.5)
    assert args.trust == [Path("a.pub"), Path("b.pub")]
    assert (args.tag, args.data_dir, args.device_id) == (["x"], Path("d"), None)


@pytest.mark.parametrize(
    "keys",
    [
        (Key("a", "A."), Key("a", "Again.")),
        (Key("a", "A.", flag="--x"), Key("b", "B.", flag="--x")),
    ],
)
def test_a_schema_declares_each_key_and_flag_once(keys: tuple[Key, ...]) -> None:
    with pytest.raises(ValueError, match="each key, and each flag, once"):
        Schema("T.", (Section("", keys),), example_package="x", example_name="x.toml")
