"""``fedge deploy`` and ``fedge rollback``: one-shot delivery over MQTT.

Each command connects to the fleet's broker as the ``coordinator`` user, drives a
:class:`~coordinator.link.hub.MqttHub` (deploys and rollbacks through
:class:`~coordinator.delivery.deliveries.Deliveries`) and disconnects:

* ``deploy ARTIFACT --to all|device:ID[,ID]|tag:TAG`` sends a signed artifact;
  with ``--wait`` it shows live per-device progress and exits 0 only when every
  targeted online device installed it. Without ``--wait`` it stays until the
  devices have the payload (or rejected it) and exits 0 without waiting for the
  installs;
* ``rollback --to ... --model NAME`` makes devices go back to their previous
  good model, and waits for their answers.

The broker and its credentials are the options of
:func:`~coordinator.cli.options.with_broker` (``--broker`` or ``FEDGE_BROKER``; the
password from ``--password-file`` or ``FEDGE_BROKER_PASSWORD``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live

from coordinator.cli.options import Connection, JsonOption, TargetOption, with_broker
from coordinator.cli.output import console, err_console, print_json, reported_errors
from coordinator.cli.views import deploy_table
from coordinator.delivery.deliveries import Artifact, Deliveries, Delivery
from coordinator.delivery.tracker import DeploymentTracker, DeployResult, DeviceState
from coordinator.link.fleet import Target
from coordinator.link.hub import HubConfig, MqttHub
from edge_agent.protocol import DEFAULT_CHUNK_BYTES

EXIT_NOT_INSTALLED = 1
_FAILED_STATES = (
    DeviceState.REJECTED,
    DeviceState.FAILED,
    DeviceState.ROLLED_BACK,
    DeviceState.TIMED_OUT,
)


@contextmanager
def connected(
    connection: Connection, *, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> Iterator[MqttHub]:
    """A hub connected to the connection's broker, stopped on exit.

    Raises:
        ConfigError: bad broker settings or an unreadable password file.
        BrokerError: cannot connect.
    """
    hub = MqttHub(HubConfig(broker=connection.broker_config(), chunk_size=chunk_size))
    hub.start(connection.connect_timeout)
    try:
        yield hub
    finally:
        hub.stop()


def _downloaded(delivery: Delivery) -> Callable[[DeploymentTracker], bool]:
    """Whether every device has the payload or refused it (dropped-out ones: not yet)."""
    moving = (DeviceState.PENDING, DeviceState.ACCEPTED, DeviceState.DOWNLOADING)

    def done(tracker: DeploymentTracker) -> bool:
        return not delivery.dropped_out() and all(p.state not in moving for p in tracker.progress())

    return done


def _follow(
    deliveries: Deliveries,
    delivery: Delivery,
    *,
    timeout: float,
    title: str,
    live: bool,
    until_downloaded: bool = False,
) -> DeployResult:
    until = _downloaded(delivery) if until_downloaded else None
    if not live:
        return deliveries.wait(delivery, timeout=timeout, until=until)
    with Live(console=err_console, refresh_per_second=8, transient=False) as view:

        def redraw(tracker: DeploymentTracker) -> None:
            view.update(deploy_table(tracker.progress(), title=title))

        result = deliveries.wait(delivery, timeout=timeout, on_change=redraw, until=until)
    err_console.print()  # a live view off a terminal ends without a newline
    return result


@with_broker
def deploy(
    connection: Connection,
    artifact: Annotated[
        Path, typer.Argument(help="The signed .fedge artifact.", exists=True, dir_okay=False)
    ],
    to: TargetOption = "all",
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for every device's install and show progress.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the devices.")
    ] = 120.0,
    chunk_size: Annotated[
        int,
        typer.Option("--chunk-size", min=1024, max=128 * 1024, help="Bytes per chunk."),
    ] = DEFAULT_CHUNK_BYTES,
    as_json: JsonOption = False,
) -> None:
    """Send a signed artifact to devices over MQTT; agents verify it before installing.

    With --wait, exits 0 only when every targeted online device installed it (and at
    least one did). Without it, exits 1 if any device rejected it, failed or timed out.
    """
    with reported_errors(as_json=as_json):
        target = Target.parse(to)
        loaded = Artifact.load(artifact)
        if not loaded.payload_matches:
            err_console.print(
                "[yellow]warning:[/] the payload does not match the manifest's sha256/length; "
                "devices will reject it"
            )
        manifest = loaded.manifest
        title = f"{manifest.name} v{manifest.version} -> {target.describe()}"
        with (
            connected(connection, chunk_size=chunk_size) as hub,
            Deliveries(hub) as deliveries,
        ):
            delivery = deliveries.deploy(loaded, target)
            result = _follow(
                deliveries, delivery, timeout=timeout, title=title,
                live=wait and not as_json, until_downloaded=not wait,
            )  # fmt: skip
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


@with_broker
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
        with connected(connection) as hub, Deliveries(hub) as deliveries:
            delivery = deliveries.rollback(target, model, reason=reason)
            result = deliveries.wait(delivery, timeout=timeout)
    if as_json:
        print_json(result.to_json())
    else:
        console.print(deploy_table(result.devices, title=title))
    states = [p.state for p in result.devices]
    if DeviceState.ROLLED_BACK not in states or not all(
        s in (DeviceState.ROLLED_BACK, DeviceState.OFFLINE) for s in states
    ):
        raise typer.Exit(EXIT_NOT_INSTALLED)
