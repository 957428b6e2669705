"""Following something that runs elsewhere: poll it until it ends.

``fedge rollout create|status --watch`` and ``fedge rounds start|status --watch``
both poll the coordinator every ``--interval`` seconds until the rollout or run
reaches a final state. :func:`follow` is that loop, written once: with ``live``
it redraws a rich view on stderr at every poll (the last frame stays on screen);
without it (``--json``) it polls quietly, so stdout carries only the final JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from rich.console import RenderableType
from rich.live import Live

from coordinator.cli.output import err_console

__all__ = ["follow"]

V = TypeVar("V")


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
