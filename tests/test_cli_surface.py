"""The shape of the ``fedge`` command line: one command per job, help everywhere,
the connection options declared once."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
import typer
import typer.main
from typer.testing import CliRunner

from coordinator.cli.app import app
from coordinator.cli.training_options import hidden_sizes, key_values

JOBS = {
    "artifacts",
    "audit",
    "broker",
    "ca",
    "coordinator",
    "data",
    "deploy",
    "device",
    "devices",
    "fleet",
    "drift",
    "keys",
    "model",
    "policy",
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
    assert {name for name, c in commands.items() if c.hidden} == set()
    fleet = commands["fleet"]
    assert isinstance(fleet, click.Group)
    # "fedge fleet" without a subcommand is still "fedge devices" (its former name).
    assert {name for name, c in fleet.commands.items() if c.hidden} == {"list"}
    callbacks = {info.name: info.callback for info in app.registered_commands}
    [fleet_app] = [g.typer_instance for g in app.registered_groups if g.name == "fleet"]
    assert fleet_app is not None
    [alias] = [c.callback for c in fleet_app.registered_commands if c.name == "list"]
    assert alias is callbacks["devices"]
    text = CliRunner().invoke(app, ["--help"], terminal_width=100).stdout
    listed = {line.split()[1] for line in text.splitlines() if line.startswith("│ ")}
    assert listed >= JOBS


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
    # deploy, rollback, train, devices (and fleet list), fleet publish and show, keys
    # publish, telemetry, presence, audit, drift, model lineage, and every subcommand
    # of artifacts, rollout, rounds and policy (set, show, list, delete, runs, approve)
    assert users == 31
    for option in CONNECTION_OPTIONS:
        texts = {help_text for help_text, _ in seen[option]}
        if option == "--broker":  # required by the MQTT commands, or the other of --api
            assert len(texts) == 2, texts
        else:
            assert len(texts) == 1, (option, texts)
    assert {env for _, env in seen["--broker"]} == {"FEDGE_BROKER"}


def test_train_and_rounds_start_share_their_run_options() -> None:
    commands = root().commands
    train = commands["train"]
    rounds = commands["rounds"]
    assert isinstance(rounds, click.Group)
    start = rounds.commands["start"]
    options = {o: p for p in train.params for o in p.opts}
    connection = {*CONNECTION_OPTIONS, "--password", "--json"}  # checked above
    shared = [
        (option, param.help)
        for param in start.params
        for option in param.opts
        if option in options and isinstance(param, click.Option) and option not in connection
    ]
    assert {option for option, _ in shared} >= {
        "--rounds", "--strategy", "--strategy-arg", "--codec", "--min-clients",
        "--round-timeout", "--model", "--family", "--features", "--classes", "--hidden",
        "--clients-per-round", "--seed", "--epochs", "--lr", "--batch-size", "--optimizer",
        "--train-arg", "--name", "--task", "--input-shape", "--outputs",
    }  # fmt: skip
    for option, help_text in shared:
        param = options[option]
        assert isinstance(param, click.Option)
        assert param.help == help_text, option


@pytest.mark.parametrize(
    ("values", "sizes"),
    [([], []), (["64"], [64]), (["128,64"], [128, 64]), (["128", "64"], [128, 64])],
)
def test_hidden_sizes(values: list[str], sizes: list[int]) -> None:
    assert hidden_sizes(values) == sizes


@pytest.mark.parametrize("value", ["0", "x", "64,-1", "1.5"])
def test_hidden_sizes_refuses_what_is_not_a_positive_integer(value: str) -> None:
    with pytest.raises(typer.BadParameter, match="positive integers"):
        hidden_sizes([value])


def test_key_values() -> None:
    parsed = key_values(
        ["lr=0.1", "epochs=2", "proximal-mu=1e-2", "flag=true", "opt=adam"], option="--x"
    )
    assert parsed == {"lr": 0.1, "epochs": 2, "proximal_mu": 0.01, "flag": True, "opt": "adam"}
    with pytest.raises(typer.BadParameter):
        key_values(["epochs"], option="--train-arg")
