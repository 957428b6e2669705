"""``fedge rollout``: staged rollouts of a signed artifact to the fleet.

* ``create ARTIFACT --to ... --canary 5% --waves 25,50,100 --soak 60s
  --max-failure 10%`` starts a rollout. ARTIFACT is a ``.fedge`` file (uploaded
  first; uploading is idempotent) or the sha256 of an uploaded artifact. The
  coordinator releases the canary, watches each stage's health for the soak time
  and releases the next wave only if the stage's failure rate stays under
  ``--max-failure``; otherwise it halts (and rolls the stage back unless
  ``--no-rollback-on-halt``). It prints the rollout's id.
* ``list``, ``status ID``: where rollouts stand, device by device.
* ``pause ID``, ``resume ID``, ``abort ID [--rollback]``.

With ``--watch`` (``create`` and ``status``) the command follows the rollout in a
live view on stderr (state, stage, devices per state), polling every
``--interval`` seconds until the rollout is ``completed`` (exit status 0),
``halted`` or ``aborted`` (status 1). Ctrl-C stops watching (status 130); the
rollout goes on (see :meth:`~coordinator.cli.operate.Connection.continues`).

Every command runs over ``--api`` or in-process (:mod:`coordinator.cli.operate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import typer

from coordinator.cli.follow import IntervalOption, WatchOption, announce, watch_and_exit
from coordinator.cli.operate import operations, resolve_artifact, show_rows, uploaded_sha256
from coordinator.cli.options import (
    ArtifactArgument,
    Connection,
    JsonOption,
    TargetOption,
    with_connection,
)
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.cli.service_views import (
    FINAL_ROLLOUT_STATES,
    rollout_view,
    rollouts_table,
    to_json,
)
from coordinator.cli.views import safe_text
from coordinator.service.operations import CLI_ACTOR, Operations, RolloutRequest, RolloutView

__all__ = ["app"]

_DEFAULTS = RolloutRequest(artifact_sha256="")

app = typer.Typer(
    help="Staged rollouts: canary, waves, health gates, pause, resume, abort.",
    no_args_is_help=True,
)

IdArgument = Annotated[str, typer.Argument(help="The rollout's id.", show_default=False)]


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _watch_and_exit(
    ops: Operations, connection: Connection, rollout_id: str, *, interval: float, as_json: bool
) -> None:
    """Follow a rollout until it completed (exit 0), halted or was aborted (exit 1)."""
    watch_and_exit(
        lambda: ops.rollout(rollout_id),
        kind="rollout",
        key=rollout_id,
        state=lambda view: view.rollout.state,
        final=FINAL_ROLLOUT_STATES,
        success="completed",
        render=lambda view: rollout_view(view, now=time.time(), devices=False),
        connection=connection,
        interval=interval,
        as_json=as_json,
        sleep=_sleep,
    )


@app.command("create")
@with_connection
def create(
    connection: Connection,
    artifact: ArtifactArgument,
    to: TargetOption = _DEFAULTS.target,
    canary: Annotated[
        str, typer.Option("--canary", help="First stage: a count (2) or a percentage (5%).")
    ] = _DEFAULTS.canary,
    waves: Annotated[
        str,
        typer.Option("--waves", help="Cumulative percentages after the canary: 25,50,100."),
    ] = _DEFAULTS.waves,
    soak: Annotated[
        str, typer.Option("--soak", help="Time each stage runs before the next: 60s, 5m.")
    ] = _DEFAULTS.soak,
    max_failure: Annotated[
        str, typer.Option("--max-failure", help="Largest failure rate a stage may have: 10%.")
    ] = _DEFAULTS.max_failure,
    min_reports: Annotated[
        int,
        typer.Option(
            "--min-reports", min=1, help="Devices of a stage that must report before judging it."
        ),
    ] = _DEFAULTS.min_reports,
    min_failed_devices: Annotated[
        int | None,
        typer.Option(
            "--min-failed-devices",
            min=1,
            help="Fewest failed devices that halt a stage (capped at its size; "
            "default: the service's rollouts.min_failed_devices, 2).",
        ),
    ] = _DEFAULTS.min_failed_devices,
    rollback_on_halt: Annotated[
        bool,
        typer.Option(
            "--rollback-on-halt/--no-rollback-on-halt",
            help="Roll the failed stage back when the rollout halts.",
        ),
    ] = _DEFAULTS.rollback_on_halt,
    install_timeout: Annotated[
        str,
        typer.Option("--install-timeout", help="Time a device may take to install: 10m."),
    ] = _DEFAULTS.install_timeout,
    max_error_increase: Annotated[
        str,
        typer.Option(
            "--max-error-increase",
            help="Health: rise of a device's error rate over its previous model allowed: 5%.",
        ),
    ] = _DEFAULTS.max_error_increase,
    max_p95_ratio: Annotated[
        float,
        typer.Option(
            "--max-p95-ratio",
            min=1.0,
            help="Health: p95 latency allowed, as a multiple of the previous model's.",
        ),
    ] = _DEFAULTS.max_p95_ratio,
    require_health: Annotated[
        bool,
        typer.Option(
            "--require-health/--no-require-health",
            help="Count a device only once a healthy telemetry window of the new model arrived.",
        ),
    ] = _DEFAULTS.require_health,
    watch_: WatchOption = False,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Start a staged rollout of an artifact; prints the rollout's id.

    With --watch, follows it and exits 0 only if it completes.
    """
    resolved = resolve_artifact(artifact)
    with reported_errors(as_json=as_json), operations(connection) as ops:
        sha256 = uploaded_sha256(ops, resolved, as_json=as_json)
        request = RolloutRequest(
            artifact_sha256=sha256,
            target=to,
            canary=canary,
            waves=waves,
            soak=soak,
            max_failure=max_failure,
            min_reports=min_reports,
            min_failed_devices=min_failed_devices,
            rollback_on_halt=rollback_on_halt,
            install_timeout=install_timeout,
            max_error_increase=max_error_increase,
            max_p95_ratio=max_p95_ratio,
            require_health=require_health,
        )
        view = ops.create_rollout(request, actor=CLI_ACTOR)
        rollout_id = view.rollout.rollout_id
        if as_json and not watch_:
            print_json(to_json(view))
            return
        if not as_json:
            announce(
                "rollout",
                rollout_id,
                detail=f" on {len(view.devices)} device(s)",
                status_command="fedge rollout status",
                watching=watch_,
            )
        if watch_:
            _watch_and_exit(ops, connection, rollout_id, interval=interval, as_json=as_json)


@app.command("list")
@with_connection
def list_rollouts(connection: Connection, as_json: JsonOption = False) -> None:
    """List rollouts, newest first."""
    show_rows(
        connection,
        lambda ops: ops.rollouts(),
        lambda rows: rollouts_table(rows, now=time.time()),
        as_json=as_json,
    )


@app.command("status")
@with_connection
def status(
    connection: Connection,
    rollout_id: IdArgument,
    watch_: WatchOption = False,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Show a rollout: state, stage, devices per state, each device.

    With --watch, follows it and exits 0 only if it completes.
    """
    with reported_errors(as_json=as_json), operations(connection) as ops:
        if watch_:
            _watch_and_exit(ops, connection, rollout_id, interval=interval, as_json=as_json)
            return
        view = ops.rollout(rollout_id)
    _show(view, as_json=as_json)


@app.command("pause")
@with_connection
def pause(connection: Connection, rollout_id: IdArgument, as_json: JsonOption = False) -> None:
    """Stop releasing new stages; devices already updated keep the model."""
    _operate(connection, lambda ops: ops.pause_rollout(rollout_id, actor=CLI_ACTOR), as_json)


@app.command("resume")
@with_connection
def resume(connection: Connection, rollout_id: IdArgument, as_json: JsonOption = False) -> None:
    """Go on with a paused rollout."""
    _operate(connection, lambda ops: ops.resume_rollout(rollout_id, actor=CLI_ACTOR), as_json)


@app.command("abort")
@with_connection
def abort(
    connection: Connection,
    rollout_id: IdArgument,
    rollback: Annotated[
        bool,
        typer.Option("--rollback", help="Also roll back every device the rollout updated."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """End a rollout now (optionally rolling its devices back)."""
    _operate(
        connection,
        lambda ops: ops.abort_rollout(rollout_id, actor=CLI_ACTOR, rollback=rollback),
        as_json,
        note=" (rolling back its devices)" if rollback else "",
    )


def _operate(
    connection: Connection,
    operation: Callable[[Operations], RolloutView],
    as_json: bool,
    *,
    note: str = "",
) -> None:
    """Run a pause, resume or abort and report the state the rollout is in after it."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        view = operation(ops)
    _report(view, as_json=as_json, note=note)


def _show(view: RolloutView, *, as_json: bool) -> None:
    if as_json:
        print_json(to_json(view))
    else:
        console.print(rollout_view(view, now=time.time()))


def _report(view: RolloutView, *, as_json: bool, note: str = "") -> None:
    if as_json:
        print_json(to_json(view))
    else:
        row = view.rollout
        console.print(
            f"rollout {safe_text(row.rollout_id)} is {safe_text(row.state)}{note}",
            highlight=False,
            markup=False,
        )
