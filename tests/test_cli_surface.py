"""The shape of the ``fedge`` command line: one command per job, help everywhere,
the connection options declared once."""

from __future__ import annotations

from collections.abc import Iterator

import click
import typer.main
from typer.testing import CliRunner

from coordinator.cli.app import app

JOBS = {
    "artifacts",
    "audit",
    "broker",
    "coordinator",
    "data",
    "deploy",
    "devices",
    "keys",
    "model",
    "presence",
    "rollback",
    "rollout",
    "rounds",
    "simulate",
    "telemetry",
    "train",
}
CONNECTION_OPTIONS = (
    "--broker",
    "--username",
    "--password-file",
    "--ca-file",
    "--cert-file",
    "--key-file",
    "--connect-timeout",
)


def root() -> click.Group:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return group


def every_command(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))


def test_help_lists_each_job_once_and_hides_the_alias() -> None:
    commands = root().commands
    assert {name for name, c in commands.items() if not c.hidden} == JOBS
    assert {name for name, c in commands.items() if c.hidden} == {"fleet"}
    callbacks = {info.name: info.callback for info in app.registered_commands}
    assert callbacks["fleet"] is callbacks["devices"]
    text = CliRunner().invoke(app, ["--help"], terminal_width=100).stdout
    listed = {line.split()[1] for line in text.splitlines() if line.startswith("│ ")}
    assert listed >= JOBS
    assert "fleet" not in listed


def test_every_command_has_help_text() -> None:
    missing = [
        " ".join(path)
        for path, command in every_command(root())
        if not (command.help or "").strip()
    ]
    assert missing == []


def test_the_connection_options_are_one_declaration() -> None:
    seen: dict[str, set[tuple[str | None, str | None]]] = {}
    users = 0
    for _path, command in every_command(root()):
        params = {o: p for p in command.params for o in p.opts}
        # fedge coordinator serve has --broker and --ca-file too, as overrides of its
        # config file (no default of their own); simulate's --broker replaces the
        # embedded broker. Every command that connects with these options has all.
        if "--connect-timeout" not in params:
            continue
        users += 1
        for option in CONNECTION_OPTIONS:
            param = params[option]
            assert isinstance(param, click.Option)
            envvar = param.envvar if isinstance(param.envvar, str) else None
            seen.setdefault(option, set()).add((param.help, envvar))
    # deploy, rollback, train, devices (and fleet), telemetry, presence, audit,
    # and every subcommand of artifacts, rollout and rounds
    assert users == 20
    for option in CONNECTION_OPTIONS:
        texts = {help_text for help_text, _ in seen[option]}
        if option == "--broker":  # required by the MQTT commands, or the other of --api
            assert len(texts) == 2, texts
        else:
            assert len(texts) == 1, (option, texts)
    assert {env for _, env in seen["--broker"]} == {"FEDGE_BROKER"}
