"""Shared plumbing of the ``fedge`` CLI: consoles, error reporting, JSON output.

Every command reports failures the same way: one line ``error: <reason>`` on stderr
(or a JSON object with ``{"ok": false, "error": {"code", "message"}}`` on stdout when
``--json`` was given) and exit status 1. Usage errors are Click's (exit status 2).
Only the three fedge exception trees are caught; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console

from compress.errors import CompressError
from coordinator.errors import CoordinatorError
from edge_agent.errors import AgentError

logger = logging.getLogger(__name__)

console = Console()
err_console = Console(stderr=True)

FedgeError = CompressError | AgentError | CoordinatorError
EXIT_FAILURE = 1


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout (no Rich markup processing)."""
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


def fail(exc: FedgeError, *, as_json: bool = False) -> NoReturn:
    """Report a fedge error in one line (or JSON) and exit with status 1."""
    code = getattr(exc, "code", "error")
    logger.debug("command failed", exc_info=exc)
    if as_json:
        print_json({"ok": False, "error": {"code": code, "message": str(exc)}})
    else:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_FAILURE)


@contextmanager
def reported_errors(*, as_json: bool = False) -> Iterator[None]:
    """Turn any fedge error raised inside the block into :func:`fail`."""
    try:
        yield
    except (CompressError, AgentError, CoordinatorError) as exc:
        fail(exc, as_json=as_json)


def human_bytes(n: int) -> str:
    """``1234567`` -> ``"1.18 MiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
