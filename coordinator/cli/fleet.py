"""``fedge fleet publish`` and ``fedge fleet show``: the fleet statement by hand.

A device configured with a fleet (``trust.fleet``, ``fedge-agent run --fleet``)
installs only what a fresh signed fleet statement names, and reports ``stale`` when
the statement it holds expires (:mod:`compress.statement`). A coordinator service
with a ``[fleet]`` table keeps the statement itself
(:mod:`coordinator.delivery.fleet_statement`); these commands are for fleets run
without one (``fedge deploy --broker``), and for looking at what the broker holds:

* ``publish --fleet F --key K.pem --model ARTIFACT|NAME@VERSION:SHA256 ...
  [--expires-in 6h] [--keep] --broker URL`` signs a statement naming exactly those
  models (``--keep``: on top of what the retained statement names) and publishes
  it retained on ``fedge/v1/broadcast/fleet.<F>``. Its version is above the one the
  broker holds. Nothing refreshes it: publish again before it expires (cron, a
  systemd timer), or run the service with ``[fleet]``;
* ``show --fleet F [--trust K.pub ...] --broker URL`` prints the retained
  statement: version, issue and expiry times, fresh or stale, and the targets;
  with ``--trust`` it checks the signature (one trusted key), else it says it did
  not. Exits 1 when there is none, it is stale, or its signature does not verify.

``fedge fleet`` without a subcommand is ``fedge devices`` (the name it had before).

Both read the retained statement through
:func:`~coordinator.link.retained.read_retained`; ``publish`` goes out through a
:class:`~coordinator.link.hub.MqttHub` and is read back to confirm the broker
keeps it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from compress.errors import CompressError
from compress.keys import SigningKey, load_public_key
from compress.manifest import Manifest, format_time
from compress.signing import TrustedKeys, verify_threshold
from compress.statement import FleetStatement, SignedStatement
from compress.statement import Target as StatementTarget
from coordinator.cli import observe
from coordinator.cli.key_loading import KeyPasswordFileOption, load_signing_keys
from coordinator.cli.options import Connection, JsonOption, with_broker
from coordinator.cli.output import console, err_console, print_json, reported_errors
from coordinator.delivery.deliveries import Artifact
from coordinator.delivery.fleet_statement import (
    DEFAULT_LIFETIME_S,
    sign_one,
    statement_message,
)
from coordinator.errors import FleetStatementError
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.link.retained import read_retained
from coordinator.rollout.policy import parse_duration
from edge_agent.config.agent import BrokerConfig
from edge_agent.errors import ProtocolError
from edge_agent.protocol import decode
from edge_agent.protocol.messages_fleet import FleetStatementMessage
from edge_agent.protocol.topics import broadcast_topic, statement_broadcast, validate_fleet_id

__all__ = [
    "EXIT_NOT_FRESH",
    "app",
    "name_before_deploy",
    "parse_target",
    "publish",
    "publish_statement",
    "retained_statement",
    "show",
]

EXIT_NOT_FRESH = 1

_TARGET_RE = re.compile(r"(?P<name>[^@\s]+)@(?P<version>[0-9]+):(?P<sha256>[0-9a-f]{64})")


class _DevicesWithoutSubcommand(TyperGroup):
    """``fedge fleet ...`` without a known subcommand runs the hidden ``list``
    (``fedge devices``, the command's former name)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DevicesWithoutSubcommand,
    help="The signed fleet statement: publish it, show it (no subcommand: fedge devices).",
)
app.command("list", hidden=True)(observe.devices)

FleetOption = Annotated[str, typer.Option("--fleet", help="The fleet id (the agents' --fleet).")]


# ------------------------------------------------------------------ library part


def retained_statement(
    broker: BrokerConfig, fleet: str, *, timeout: float
) -> SignedStatement | None:
    """The signed statement the broker holds for ``fleet`` (unverified), or None.

    Raises:
        BrokerError: the broker cannot be reached.
        FleetStatementError: what is retained is not a fleet statement message.
    """
    topic = broadcast_topic(statement_broadcast(validate_fleet_id(fleet)))
    payload = read_retained(broker, topic, timeout=timeout)
    if payload is None:
        return None
    try:
        message = decode(payload).message
        if not isinstance(message, FleetStatementMessage):
            raise FleetStatementError(f"{topic} holds a {message.TYPE} message, not a statement")
        return SignedStatement.from_bytes(message.statement)
    except (ProtocolError, CompressError) as exc:
        raise FleetStatementError(f"{topic} holds no readable statement: {exc}") from exc


def _checked(signed: SignedStatement, trusted: TrustedKeys) -> FleetStatement:
    """The statement, once one trusted key's signature verifies (any expiry).

    Raises:
        FleetStatementError: no trusted signature, or not a statement.
    """
    try:
        verify_threshold(signed, TrustedKeys(trusted.keys, 1))
        return signed.statement
    except CompressError as exc:
        raise FleetStatementError(f"the retained statement does not verify: {exc}") from exc


def publish_statement(
    broker: BrokerConfig,
    fleet: str,
    targets: dict[str, StatementTarget],
    keys: Sequence[SigningKey],
    *,
    lifetime_s: float,
    keep: bool,
    timeout: float,
) -> FleetStatement:
    """Sign a statement of ``targets`` (with ``keep``: over the retained one's) and
    publish it retained; the broker's copy is read back to confirm.

    The retained statement counts only when it verifies with ``keys``: then the new
    version is above its version and ``keep`` keeps its targets. One that does not
    verify is ignored (with a note on stderr).

    Raises:
        BrokerError: the broker cannot be reached.
        FleetStatementError: a bad target or lifetime, or the broker did not keep
            the new statement.
    """
    held = retained_statement(broker, fleet, timeout=timeout)
    trusted = TrustedKeys.of([k.public_key for k in keys], 1)
    last: FleetStatement | None = None
    if held is not None:
        try:
            last = _checked(held, trusted)
        except FleetStatementError as exc:
            err_console.print(f"note: ignoring the broker's statement: {exc}", highlight=False)
    merged = {**(last.targets if keep and last is not None else {}), **targets}
    signed = sign_one(
        fleet, merged, keys, now=time.time(), lifetime_s=lifetime_s,
        last_version=last.version if last is not None else 0,
    )  # fmt: skip
    hub = MqttHub(HubConfig(broker=broker, sync_timeout_s=timeout))
    hub.start(timeout)
    try:
        if not hub.publish_retained(statement_broadcast(fleet), statement_message(signed)):
            raise FleetStatementError(f"fleet {fleet}: the statement could not be sent")
        hub.sync_fleet()  # our own messages come back in order: the publish was handled
    finally:
        hub.stop()
    back = retained_statement(broker, fleet, timeout=timeout)
    if back is None or back.to_bytes() != signed.to_bytes():
        raise FleetStatementError(f"fleet {fleet}: the broker did not keep the new statement")
    return signed.statement


def name_before_deploy(
    connection: Connection,
    fleet: str,
    key_files: Sequence[Path],
    manifest: Manifest,
    password_file: Path | None = None,
) -> FleetStatement:
    """``fedge deploy --fleet``: publish a statement naming ``manifest`` (and what the
    retained statement names), valid :data:`DEFAULT_LIFETIME_S`.

    Raises:
        FleetStatementError: through ``--api``, or without ``--statement-key``.
        BrokerError: the broker cannot be reached.
        CompressError: a key cannot be read.
    """
    if connection.api is not None:
        raise FleetStatementError(
            "--fleet is for --broker: a coordinator service names its deploys in the "
            "fleet statement itself when its config has a [fleet] table"
        )
    if not key_files:
        raise FleetStatementError("--fleet needs --statement-key (the key that signs it)")
    keys = load_signing_keys(key_files, password_file)
    target = StatementTarget(manifest.version, manifest.sha256)
    statement = publish_statement(
        connection.broker_config(), validate_fleet_id(fleet), {manifest.name: target}, keys,
        lifetime_s=DEFAULT_LIFETIME_S, keep=True, timeout=connection.connect_timeout,
    )  # fmt: skip
    _warn_not_refreshed(statement)
    return statement


def _warn_not_refreshed(statement: FleetStatement) -> None:
    err_console.print(
        f"note: nothing refreshes the fleet statement; publish again (fedge fleet publish "
        f"--keep) before {format_time(statement.expires)}, or run the service with [fleet]",
        highlight=False,
        soft_wrap=True,
    )


def parse_target(text: str) -> tuple[str, StatementTarget]:
    """``NAME@VERSION:SHA256``, or a ``.fedge`` artifact file (its manifest's values).

    Raises:
        FleetStatementError: neither form.
        CompressError: the artifact cannot be read.
    """
    match = _TARGET_RE.fullmatch(text.strip())
    if match is not None and not Path(text).exists():
        try:
            target = StatementTarget(int(match["version"]), match["sha256"])
        except CompressError as exc:
            raise FleetStatementError(f"--model {text!r}: {exc}") from exc
        return match["name"], target
    path = Path(text)
    if not path.is_file():
        raise FleetStatementError(
            f"--model {text!r}: neither an artifact file nor NAME@VERSION:SHA256"
        )
    manifest = Artifact.load(path).manifest
    return manifest.name, StatementTarget(manifest.version, manifest.sha256)


def statement_json(statement: FleetStatement, *, now: float, verified: bool) -> dict[str, Any]:
    """What ``show --json`` prints."""
    return {
        "fleet": statement.fleet,
        "version": statement.version,
        "issued": format_time(statement.issued),
        "expires": format_time(statement.expires),
        "fresh": statement.expires.timestamp() > now,
        "verified": verified,
        "targets": {n: t.to_dict() for n, t in statement.targets.items()},
    }


def _print(statement: FleetStatement, *, now: float, verified: bool, as_json: bool) -> None:
    if as_json:
        print_json(statement_json(statement, now=now, verified=verified))
        return
    left = statement.expires.timestamp() - now
    state = f"fresh ({left / 3600:.1f} h left)" if left > 0 else "STALE"
    check = "signature verified" if verified else "signature NOT checked (give --trust)"
    console.print(f"{statement.describe()}: {state}, {check}", highlight=False)
    console.print(f"issued {format_time(statement.issued)}", highlight=False)
    for name, target in statement.targets.items():
        console.print(f"  {name} v{target.version} sha256 {target.sha256}", highlight=False)
    if not statement.targets:
        console.print("  (names no model: devices of this fleet install nothing)")


# ------------------------------------------------------------------ the commands


@app.command("publish")
@with_broker
def publish(
    connection: Connection,
    fleet: FleetOption,
    key: Annotated[
        list[Path],
        typer.Option("--key", help="Private key that signs the statement (repeatable)."),
    ],
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="A .fedge artifact, or NAME@VERSION:SHA256, the statement names (repeatable).",
        ),
    ] = None,
    expires_in: Annotated[
        str, typer.Option("--expires-in", help="Lifetime: 90s, 30m, 6h, 2d.")
    ] = "6h",
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="Also name what the retained statement (signed by --key) names."
        ),
    ] = False,
    key_password_file: KeyPasswordFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Sign and publish the fleet statement (retained); nothing refreshes it."""
    with reported_errors(as_json=as_json):
        fleet = validate_fleet_id(fleet)
        lifetime = parse_duration(expires_in) if expires_in else DEFAULT_LIFETIME_S
        signing = load_signing_keys(key, key_password_file)
        targets = dict(parse_target(text) for text in model or ())
        statement = publish_statement(
            connection.broker_config(), fleet, targets, signing,
            lifetime_s=lifetime, keep=keep, timeout=connection.connect_timeout,
        )  # fmt: skip
    _print(statement, now=time.time(), verified=True, as_json=as_json)
    if not as_json:
        _warn_not_refreshed(statement)


@app.command("show")
@with_broker
def show(
    connection: Connection,
    fleet: FleetOption,
    trust: Annotated[
        list[Path] | None,
        typer.Option("--trust", help="Public key the statement may be signed by (repeatable)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print the retained fleet statement; exit 1 if none, stale or not verified."""
    with reported_errors(as_json=as_json):
        held = retained_statement(
            connection.broker_config(), fleet, timeout=connection.connect_timeout
        )
        if held is None:
            raise FleetStatementError(f"the broker holds no statement for fleet {fleet}")
        if trust:
            statement = _checked(held, TrustedKeys.of([load_public_key(p) for p in trust], 1))
        else:
            statement = held.statement
    now = time.time()
    _print(statement, now=now, verified=bool(trust), as_json=as_json)
    if statement.expires <= datetime.fromtimestamp(now, UTC):
        raise typer.Exit(EXIT_NOT_FRESH)
