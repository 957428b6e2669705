"""Following something that runs elsewhere: poll it until it ends.

``fedge rollout create|status --watch`` and ``fedge rounds start|status --watch``
both poll the coordinator every ``--interval`` seconds until the rollout or run
reaches a final state. :func:`follow` is that loop, written once: with ``live``
it redraws a rich view on stderr at every poll (the last frame stays on screen);
without it (``--json``) it polls quietly, so stdout carries only the final JSON.

Around it, what both commands do the same way: :func:`announce` prints the id of
what was started (stdout) and how to follow it (stderr); :func:`watch_and_exit`
follows, prints ``rollout ID: STATE`` / ``run ID: STATE`` (or the final view as
JSON) and exits 0 only on success, :data:`EXIT_NOT_DONE` otherwise, and
:data:`EXIT_INTERRUPTED` on Ctrl-C (saying where the thing goes on).
``--watch`` and ``--interval`` are :data:`WatchOption` and :data:`IntervalOption`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import RenderableType
from rich.live import Live

from coordinator.cli.options import Connection
from coordinator.cli.output import console, err_console, print_json
from coordinator.cli.service_views import to_json
from coordinator.cli.views import safe_text

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NOT_DONE",
    "IntervalOption",
    "WatchOption",
    "announce",
    "follow",
    "print_outcome",
    "watch_and_exit",
]

V = TypeVar("V")

EXIT_NOT_DONE = 1
"""Exit status of ``--watch`` when it ended otherwise than well (halted, failed...)."""

EXIT_INTERRUPTED = 130
"""Exit status when the operator stops watching with Ctrl-C."""

WatchOption = Annotated[bool, typer.Option("--watch", "-w", help="Follow it live until it ends.")]
IntervalOption = Annotated[
    float, typer.Option("--interval", min=0.1, help="Seconds between refreshes with --watch.")
]


def follow(
    fetch: Callable[[], V],
    *,
    done: Callable[[V], bool],
    render: Callable[[V], RenderableType],
    interval: float,
    live: bool,
    sleep: Callable[[float], None],
) -> V:
    """Poll ``fetch`` every ``interval`` seconds until ``done`` says it ended.

    Args:
        fetch: Reads the current state (one API call or store read).
        done: Whether a state is final.
        render: The live view of a state (used with ``live`` only).
        interval: Seconds between polls.
        live: Redraw ``render(state)`` on stderr after every poll.
        sleep: Waits between polls (the commands pass their own, for tests).

    Returns:
        The first final state.

    Raises:
        Whatever ``fetch`` raises; KeyboardInterrupt on Ctrl-C.
    """
    state = fetch()
    if not live:
        while not done(state):
            sleep(interval)
            state = fetch()
        return state
    with Live(render(state), console=err_console, refresh_per_second=4) as display:
        while not done(state):
            sleep(interval)
            state = fetch()
            display.update(render(state))
    err_console.print()  # a live view off a terminal ends without a newline
    return state


def announce(kind: str, key: str, *, detail: str = "", status_command: str, watching: bool) -> None:
    """Print the id of something just started, and (on stderr) how to follow it.

    Args:
        kind: ``rollout`` or ``run``.
        key: Its id, printed alone on stdout (for scripts).
        detail: Said after "started" (`` on 3 device(s)``).
        status_command: The command that shows it (``fedge rollout status``).
        watching: Whether this command follows it now (then no hint).
    """
    shown = safe_text(key)
    console.print(shown, highlight=False, markup=False)
    hint = "" if watching else f"; follow it: {status_command} {shown} --watch"
    err_console.print(f"{kind} {shown} started{detail}{hint}", highlight=False, markup=False)


def print_outcome(kind: str, key: str, state: str, view: object, *, as_json: bool) -> None:
    """Print ``KIND KEY: STATE``, or the whole view as JSON with ``--json``."""
    if as_json:
        print_json(to_json(view))
    else:
        console.print(f"{kind} {safe_text(key)}: {safe_text(state)}", highlight=False, markup=False)


def watch_and_exit(
    fetch: Callable[[], V],
    *,
    kind: str,
    key: str,
    state: Callable[[V], str],
    final: frozenset[str],
    success: str,
    render: Callable[[V], RenderableType],
    connection: Connection,
    interval: float,
    as_json: bool,
    sleep: Callable[[float], None],
) -> None:
    """Follow something until its state is final, report it; exit unless it succeeded.

    Args:
        fetch: Reads it (one API call or store read).
        kind: ``rollout`` or ``run``.
        key: Its id.
        state: Its state's name.
        final: The states after which nothing more happens on its own.
        success: The final state that exits 0.
        render: Its live view.
        connection: Where it runs (to say where it goes on after Ctrl-C).
        interval: Seconds between polls.
        as_json: Print the final view as JSON, and no live view.
        sleep: Waits between polls.

    Raises:
        typer.Exit: :data:`EXIT_NOT_DONE` on a final state other than ``success``,
            :data:`EXIT_INTERRUPTED` on Ctrl-C.
    """
    try:
        view = follow(
            fetch,
            done=lambda v: state(v) in final,
            render=render,
            interval=interval,
            live=not as_json,
            sleep=sleep,
        )
    except KeyboardInterrupt:
        where = connection.continues(f"{kind} {key}")
        err_console.print(f"stopped watching; {safe_text(where)}", highlight=False, markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    print_outcome(kind, key, state(view), view, as_json=as_json)
    if state(view) != success:
        raise typer.Exit(EXIT_NOT_DONE)
