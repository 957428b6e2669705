"""``fedge deploy``, ``fedge fleet`` and ``fedge rollback``: the fleet over MQTT.

Each command connects to the fleet's broker as the ``coordinator`` user, drives a
:class:`~coordinator.link.hub.MqttHub` (deploys and rollbacks through
:class:`~coordinator.delivery.deliveries.Deliveries`) and disconnects:

* ``fleet`` lists the devices that announced themselves (retained status);
* ``deploy ARTIFACT --to all|device:ID[,ID]|tag:TAG`` sends a signed artifact;
  with ``--wait`` it shows live per-device progress and exits 0 only when every
  targeted online device installed it. Without ``--wait`` it stays until the
  devices have the payload (or rejected it) and exits 0 without waiting for the
  installs;
* ``rollback --to ... --model NAME`` makes devices go back to their previous
  good model, and waits for their answers.

The broker password comes from ``--password-file`` or ``FEDGE_BROKER_PASSWORD``;
the broker URL from ``--broker`` or ``FEDGE_BROKER``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live

from compress.fileio import read_bounded
from coordinator.cli.output import console, err_console, print_json, reported_errors
from coordinator.cli.views import deploy_table, fleet_json, fleet_table
from coordinator.delivery.deliveries import Artifact, Deliveries, Delivery
from coordinator.delivery.tracker import DeploymentTracker, DeployResult, DeviceState
from coordinator.link.fleet import Target
from coordinator.link.hub import HubConfig, MqttHub
from edge_agent.config.agent import BrokerConfig
from edge_agent.errors import ConfigError
from edge_agent.protocol import COORDINATOR_SENDER, DEFAULT_CHUNK_BYTES

EXIT_NOT_INSTALLED = 1
_FAILED_STATES = (
    DeviceState.REJECTED,
    DeviceState.FAILED,
    DeviceState.ROLLED_BACK,
    DeviceState.TIMED_OUT,
)
MAX_PASSWORD_FILE_BYTES = 4096

BrokerOption = Annotated[
    str,
    typer.Option(
        "--broker", envvar="FEDGE_BROKER", help="Broker URL: mqtt://host:1883 or mqtts://host:8883."
    ),
]
UsernameOption = Annotated[
    str, typer.Option("--username", help="MQTT username (the broker ACL's coordinator account).")
]
PasswordFileOption = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="File holding the MQTT password (or set FEDGE_BROKER_PASSWORD).",
        dir_okay=False,
    ),
]
PasswordEnv = Annotated[
    str | None, typer.Option("--password", envvar="FEDGE_BROKER_PASSWORD", hidden=True)
]
CaOption = Annotated[Path | None, typer.Option("--ca-file", help="CA bundle for mqtts://.")]
CertOption = Annotated[Path | None, typer.Option("--cert-file", help="Client certificate (mTLS).")]
KeyOption = Annotated[Path | None, typer.Option("--key-file", help="Client key (mTLS).")]
ConnectTimeoutOption = Annotated[
    float,
    typer.Option("--connect-timeout", min=0.1, help="Seconds to wait for the broker."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
TargetOption = Annotated[
    str,
    typer.Option("--to", help="Which devices: all, device:ID[,ID...] or tag:TAG."),
]


def broker_config(
    url: str,
    *,
    username: str,
    password: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> BrokerConfig:
    """Build the coordinator's broker settings from the CLI options.

    Raises:
        ConfigError: a bad URL or an unreadable password file.
    """
    if password_file is not None:
        raw = read_bounded(
            password_file, max_bytes=MAX_PASSWORD_FILE_BYTES, error=ConfigError, what="password"
        )
        password = raw.decode(errors="replace").strip()
    return BrokerConfig.from_url(
        url,
        username=username,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )


@contextmanager
def connected(
    broker: BrokerConfig, *, timeout: float, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> Iterator[MqttHub]:
    """A started hub, stopped on exit.

    Raises:
        BrokerError: cannot connect.
    """
    hub = MqttHub(HubConfig(broker=broker, chunk_size=chunk_size))
    hub.start(timeout)
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


def deploy(
    artifact: Annotated[
        Path, typer.Argument(help="The signed .fedge artifact.", exists=True, dir_okay=False)
    ],
    broker: BrokerOption,
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
    username: UsernameOption = COORDINATOR_SENDER,
    password_file: PasswordFileOption = None,
    password: PasswordEnv = None,
    ca_file: CaOption = None,
    cert_file: CertOption = None,
    key_file: KeyOption = None,
    connect_timeout: ConnectTimeoutOption = 10.0,
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
        config = broker_config(
            broker, username=username, password=password, password_file=password_file,
            ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        )  # fmt: skip
        manifest = loaded.manifest
        title = f"{manifest.name} v{manifest.version} -> {target.describe()}"
        with (
            connected(config, timeout=connect_timeout, chunk_size=chunk_size) as hub,
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


def fleet(
    broker: BrokerOption,
    username: UsernameOption = COORDINATOR_SENDER,
    password_file: PasswordFileOption = None,
    password: PasswordEnv = None,
    ca_file: CaOption = None,
    cert_file: CertOption = None,
    key_file: KeyOption = None,
    connect_timeout: ConnectTimeoutOption = 10.0,
    as_json: JsonOption = False,
) -> None:
    """List the devices seen on the broker: online/offline, model, last seen."""
    with reported_errors(as_json=as_json):
        config = broker_config(
            broker, username=username, password=password, password_file=password_file,
            ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        )  # fmt: skip
        with connected(config, timeout=connect_timeout) as hub:
            records = hub.fleet()
    now = time.time()
    if as_json:
        print_json({"devices": fleet_json(records, now)})
    elif records:
        console.print(fleet_table(records, now=now))
    else:
        err_console.print("no devices have announced themselves on this broker")


def rollback(
    broker: BrokerOption,
    model: Annotated[str, typer.Option("--model", help="Model name to roll back.")],
    to: TargetOption = "all",
    reason: Annotated[str, typer.Option("--reason", help="Why (logged by the agents).")] = "",
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds to wait.")] = 60.0,
    username: UsernameOption = COORDINATOR_SENDER,
    password_file: PasswordFileOption = None,
    password: PasswordEnv = None,
    ca_file: CaOption = None,
    cert_file: CertOption = None,
    key_file: KeyOption = None,
    connect_timeout: ConnectTimeoutOption = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Make devices go back to their previous good model.

    Exits 0 when every targeted online device rolled back (and at least one did).
    """
    with reported_errors(as_json=as_json):
        target = Target.parse(to)
        config = broker_config(
            broker, username=username, password=password, password_file=password_file,
            ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        )  # fmt: skip
        title = f"rollback {model} -> {target.describe()}"
        with connected(config, timeout=connect_timeout) as hub, Deliveries(hub) as deliveries:
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
