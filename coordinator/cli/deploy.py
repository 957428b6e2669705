"""``fedge deploy`` and ``fedge rollback``: one-shot delivery to the fleet.

Both run wherever the other fleet commands run (:mod:`coordinator.cli.operate`):
against a coordinator service (``--api``) or in-process (``--broker``, on a
temporary database unless ``--db`` is given), through the same
:class:`~coordinator.service.operations.Operations` calls
(:meth:`~coordinator.service.operations.Operations.deploy`,
:meth:`~coordinator.service.operations.Operations.rollback`, then
:meth:`~coordinator.service.operations.Operations.deployment` polled every
:data:`POLL_S` seconds), so they print the same and exit the same either way:

* ``deploy ARTIFACT --to all|device:ID[,ID]|tag:TAG`` uploads a signed artifact
  (a ``.fedge`` file; the service verifies it against its trusted keys, in-process
  those of ``--trust``), or names an uploaded one by its sha256, and sends it to
  every targeted device at once. With ``--wait`` it shows live per-device progress
  and exits 0 only when every targeted online device installed it (and at least
  one did). Without ``--wait`` it stays until the devices have the payload (or
  refused it), prints the table, and exits 1 if any device rejected it, failed or
  timed out (a service goes on following the installs; in-process they go on on
  the devices);
* ``rollback --to ... --model NAME`` makes devices go back to their previous
  good model, waits for their answers, and exits 0 when every targeted online
  device rolled back (and at least one did).

Both are written to the audit log of the database they run on, exactly as through
the API (:meth:`~coordinator.service.fleet_service.FleetService.deploy`): who
(``cli:<login>`` in-process, the token's id through ``--api``), the action
(``deployment.create``, ``rollback.create``), the deployment's id, and the artifact's
sha256, model, version and target (or the model, target and reason of a rollback).
In-process, give ``--db`` the coordinator's database to keep that record: without
it the service runs on a temporary database, and the command says on stderr that
nothing will be kept.

With ``--fleet F --statement-key K.pem`` (in-process only), ``deploy`` first
publishes a fleet statement naming the artifact (on top of what the retained
statement names, :func:`coordinator.cli.fleet.name_before_deploy`), so devices
configured with that fleet accept it. Nothing refreshes that statement: it goes
stale after six hours unless ``fedge fleet publish --keep`` runs again; a service
with a ``[fleet]`` table keeps it fresh and names its deploys itself.

A staged rollout (canary, waves, health gates) is ``fedge rollout``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.fleet import name_before_deploy
from coordinator.cli.follow import follow
from coordinator.cli.key_loading import KeyPasswordFileOption
from coordinator.cli.operate import operations, resolve_artifact, uploaded_sha256
from coordinator.cli.options import (
    ArtifactArgument,
    Connection,
    JsonOption,
    TargetOption,
    with_snapshot_connection,
)
from coordinator.cli.output import console, err_console, print_json, reported_errors
from coordinator.cli.views import deploy_table
from coordinator.delivery.deliveries import Artifact
from coordinator.delivery.tracker import DeployResult, DeviceState
from coordinator.errors import FleetStatementError
from coordinator.link.fleet import Target
from coordinator.service.operations import (
    CLI_ACTOR,
    DeploymentView,
    DeployRequest,
    Operations,
    RollbackRequest,
)
from edge_agent.protocol import DEFAULT_CHUNK_BYTES

__all__ = ["EXIT_NOT_INSTALLED", "POLL_S", "deploy", "rollback"]

EXIT_NOT_INSTALLED = 1
POLL_S = 0.25
"""Seconds between two reads of a deployment's progress."""

_FAILED_STATES = (
    DeviceState.REJECTED,
    DeviceState.FAILED,
    DeviceState.ROLLED_BACK,
    DeviceState.TIMED_OUT,
)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _warn_unaudited(connection: Connection, what: str) -> None:
    """Say on stderr that an in-process command on a temporary database leaves no audit."""
    if connection.api is None and connection.db is None:
        err_console.print(
            f"note: no --db, so this {what} is recorded in no audit log; give --db the "
            "coordinator's database to keep a record of it",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _follow(
    ops: Operations, view: DeploymentView, *, title: str, live: bool, until_delivered: bool
) -> DeployResult:
    """Poll a deployment until it is done (or, with ``until_delivered``, delivered)."""
    deployment_id = view.result.deployment_id
    final = follow(
        lambda: ops.deployment(deployment_id),
        done=lambda v: v.done or (until_delivered and v.delivered),
        render=lambda v: deploy_table(v.result.devices, title=title),
        interval=POLL_S,
        live=live,
        sleep=_sleep,
    )
    return final.result


@with_snapshot_connection
def deploy(
    connection: Connection,
    artifact: ArtifactArgument,
    to: TargetOption = "all",
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for every device's install and show progress.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the devices.")
    ] = 120.0,
    chunk_size: Annotated[
        int,
        typer.Option(
            "--chunk-size",
            min=1024,
            max=128 * 1024,
            help="Bytes per chunk (in-process; a service uses its own).",
        ),
    ] = DEFAULT_CHUNK_BYTES,
    fleet: Annotated[
        str | None,
        typer.Option(
            "--fleet",
            help="In-process: first publish a fleet statement naming the artifact "
            "(a service with [fleet] does it itself).",
        ),
    ] = None,
    statement_key: Annotated[
        list[Path] | None,
        typer.Option("--statement-key", help="Private key that signs that statement."),
    ] = None,
    key_password_file: KeyPasswordFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a signed artifact to devices at once; agents verify it before installing.

    With --wait, exits 0 only when every targeted online device installed it (and at
    least one did). Without it, exits 1 if any device rejected it, failed or timed out.
    """
    resolved = resolve_artifact(artifact)
    with reported_errors(as_json=as_json):
        target = Target.parse(to)
        if fleet is not None:
            if not isinstance(resolved, bytes):
                raise FleetStatementError("--fleet needs ARTIFACT as a .fedge file")
            manifest = Artifact.from_bytes(resolved).manifest
            name_before_deploy(connection, fleet, statement_key or (), manifest, key_password_file)
        _warn_unaudited(connection, "deployment")
        with operations(connection, chunk_size=chunk_size) as ops:
            sha256 = uploaded_sha256(ops, resolved, as_json=as_json)
            view = ops.deploy(DeployRequest(sha256, target=to, timeout_s=timeout), actor=CLI_ACTOR)
            title = f"{view.result.model} v{view.result.version} -> {target.describe()}"
            result = _follow(
                ops, view, title=title, live=wait and not as_json, until_delivered=not wait
            )
    _report(result, title=title, as_json=as_json, waited=wait)


def _report(result: DeployResult, *, title: str, as_json: bool, waited: bool) -> None:
    if as_json:
        print_json(result.to_json())
    elif not waited:
        console.print(deploy_table(result.devices, title=title))
    if waited and not result.succeeded:
        if not as_json:
            counts = {str(k): v for k, v in result.counts().items() if v}
            err_console.print(f"[bold red]not installed everywhere:[/] {counts}")
        raise typer.Exit(EXIT_NOT_INSTALLED)
    if not waited and any(p.state in _FAILED_STATES for p in result.devices):
        raise typer.Exit(EXIT_NOT_INSTALLED)


@with_snapshot_connection
def rollback(
    connection: Connection,
    model: Annotated[str, typer.Option("--model", help="Model name to roll back.")],
    to: TargetOption = "all",
    reason: Annotated[str, typer.Option("--reason", help="Why (logged by the agents).")] = "",
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds to wait.")] = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Make devices go back to their previous good model.

    Exits 0 when every targeted online device rolled back (and at least one did).
    """
    with reported_errors(as_json=as_json):
        target = Target.parse(to)
        title = f"rollback {model} -> {target.describe()}"
        request = RollbackRequest(model, target=to, reason=reason, timeout_s=timeout)
        _warn_unaudited(connection, "rollback")
        with operations(connection) as ops:
            view = ops.rollback(request, actor=CLI_ACTOR)
            result = _follow(ops, view, title=title, live=False, until_delivered=False)
    if as_json:
        print_json(result.to_json())
    else:
        console.print(deploy_table(result.devices, title=title))
    states = [p.state for p in result.devices]
    if DeviceState.ROLLED_BACK not in states or not all(
        s in (DeviceState.ROLLED_BACK, DeviceState.OFFLINE) for s in states
    ):
        raise typer.Exit(EXIT_NOT_INSTALLED)
