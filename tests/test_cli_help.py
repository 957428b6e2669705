"""Every ``fedge`` command prints its help in the environment pip resolved for the project.

The CLI is built with typer; amqtt 0.11 pins typer 0.15, whose help crashes on click >= 8.2
(``make_metavar() missing 1 required positional argument: 'ctx'``), so pyproject.toml bounds
click (and the import-linter release that the dev extra may pull in). These tests run the
installed console script and then every command of the tree in a fresh interpreter: a
dependency that breaks the help of any command fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEDGE = Path(sys.executable).parent / "fedge"

# One interpreter walks the command tree and runs the console-script entry point with
# `<command> --help` for each command: starting one process per command would take a minute.
WALK_AND_RUN_HELP = """
import contextlib, io, json, sys, traceback
import click, typer
from coordinator.cli.app import app, main

def walk(command, path):
    yield path
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from walk(command.get_command(ctx, name), [*path, name])

results = {}
for path in walk(typer.main.get_command(app), []):
    out = io.StringIO()
    sys.argv = ["fedge", *path, "--help"]
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main()
        except SystemExit as stop:
            code = stop.code
        except Exception:
            traceback.print_exc()
            code = "exception"
    results[" ".join(path)] = {"code": code, "output": out.getvalue()}
print(json.dumps(results))
"""


def _environment() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "100", "TERM": "dumb"}


def test_fedge_help_through_the_console_script() -> None:
    assert FEDGE.exists(), f"the fedge console script is not installed beside {sys.executable}"
    result = subprocess.run(
        [str(FEDGE), "--help"],
        capture_output=True,
        text=True,
        env=_environment(),
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "Usage" in result.stdout
    assert "simulate" in result.stdout


def test_every_command_prints_its_help() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WALK_AND_RUN_HELP],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_environment(),
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert "simulate" in results
    assert len(results) > 20  # the whole tree: groups and their commands
    failures = {
        command: outcome["output"]
        for command, outcome in results.items()
        if outcome["code"] != 0
        or "Traceback" in outcome["output"]
        or "Usage" not in outcome["output"]
    }
    assert failures == {}
