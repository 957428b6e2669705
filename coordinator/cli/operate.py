"""Where the operator's commands run: a coordinator's HTTP API, or in-process.

Every command that operates the fleet (``fedge devices``, ``telemetry``,
``artifacts``, ``rollout``, ``rounds``, ``audit``) is written once against
:class:`~coordinator.service.operations.Operations` and gets it from :func:`operations`:

* ``--api URL`` (``FEDGE_API``) with ``--token`` (``FEDGE_TOKEN``): an
  :class:`~coordinator.service.api_client.ApiClient` talking to ``fedge coordinator
  serve``, which keeps running rollouts and runs after the command exits;
* ``--broker URL`` (``FEDGE_BROKER``) with ``--db`` (``FEDGE_DB``), ``--trust``
  and the broker's credentials: a :class:`~coordinator.service.fleet_service.FleetService`
  started in this process (:func:`~coordinator.service.fleet_service.local_service`) on the
  same SQLite state the long-running service uses. A rollout or run it starts
  goes on only while the command runs, and resumes when a service next opens
  that database.

Exactly one of the two must be given. When one comes from the command line and
the other from the environment, the command line wins (so an exported
``FEDGE_BROKER`` does not get in the way of ``--api``); both from the same place,
or neither, is a usage error (exit status 2). ``--api`` needs a token; the options
of the in-process mode (``--db``, ``--trust``, the broker's credentials) are
ignored with ``--api``, where the service has its own.

The options are added to each command by :func:`with_connection`, which hands the
command a :class:`Connection` as its first argument::

    @with_connection
    def devices(connection: Connection, as_json: JsonOption = False) -> None:
        with reported_errors(as_json=as_json), operations(connection) as ops:
            rows = ops.devices()
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Concatenate, ParamSpec, get_args

import click
import typer
from click.core import ParameterSource

from compress.errors import ArtifactError
from compress.fileio import read_bounded
from coordinator.cli.fleet import (
    CaOption,
    CertOption,
    ConnectTimeoutOption,
    KeyOption,
    PasswordEnv,
    PasswordFileOption,
    UsernameOption,
    broker_config,
)
from coordinator.service.api_client import DEFAULT_TIMEOUT_S, ApiClient
from coordinator.service.operations import Operations
from edge_agent.protocol import COORDINATOR_SENDER

__all__ = [
    "DEFAULT_DB",
    "MAX_ARTIFACT_BYTES",
    "Connection",
    "operations",
    "read_artifact",
    "with_connection",
]

DEFAULT_DB = Path("fedge-coordinator.db")
"""The in-process mode's state when neither ``--db`` nor ``FEDGE_DB`` is given."""

MAX_ARTIFACT_BYTES = 512 << 20
"""Largest artifact file the CLI reads (the API's default upload limit)."""

PANEL = "Connection"
"""Help panel of the connection options."""

_P = ParamSpec("_P")


@dataclass(frozen=True)
class Connection:
    """Where a command's operations run (the connection options' values).

    Attributes:
        api: The coordinator API's URL (remote mode), or None.
        token: The API token (remote mode).
        api_timeout: Seconds to wait for each step of an API request.
        broker: The broker's URL (in-process mode), or None.
        db: The in-process service's SQLite state.
        trust: Public keys uploads must be signed by (in-process mode).
        threshold: How many of them must sign.
        username: MQTT username.
        password: MQTT password (from ``FEDGE_BROKER_PASSWORD``).
        password_file: File holding the MQTT password.
        ca_file: CA bundle for ``mqtts://``.
        cert_file: Client certificate (mTLS).
        key_file: Client key (mTLS).
        connect_timeout: Seconds to wait for the broker.
    """

    api: str | None = None
    token: str | None = field(default=None, repr=False)
    api_timeout: float = DEFAULT_TIMEOUT_S
    broker: str | None = None
    db: Path = DEFAULT_DB
    trust: tuple[Path, ...] = ()
    threshold: int = 1
    username: str = COORDINATOR_SENDER
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    connect_timeout: float = 10.0

    def continues(self, what: str) -> str:
        """Say where something started by this command goes on after it exits."""
        if self.api is not None:
            return f"{what} continues on the coordinator service"
        return (
            f"{what} is saved in {self.db}; it resumes when a coordinator "
            "(fedge coordinator serve, or another command) opens that database"
        )


@contextmanager
def operations(connection: Connection) -> Iterator[Operations]:
    """The operations of a connection: an API client, or a started local service.

    Args:
        connection: Where to run (exactly one of ``api`` and ``broker`` is set).

    Yields:
        An :class:`Operations` object, closed or stopped when the block ends.

    Raises:
        ApiError: a bad API URL or token.
        ConfigError: bad broker settings or an unreadable password file.
        BrokerError: the broker cannot be reached.
        StoreError: the database cannot be opened.
        CompressError: a ``--trust`` key cannot be read.
    """
    if connection.api is not None:
        with ApiClient(
            connection.api, connection.token or "", timeout=connection.api_timeout
        ) as client:
            yield client
        return
    if connection.broker is None:  # with_connection makes sure one is set
        raise click.UsageError("give --api URL or --broker URL")
    # Imported here: the service brings Flower and the rollout engine, which the
    # remote mode does not need.
    from coordinator.service.fleet_service import local_service  # noqa: PLC0415

    broker = broker_config(
        connection.broker,
        username=connection.username,
        password=connection.password,
        password_file=connection.password_file,
        ca_file=connection.ca_file,
        cert_file=connection.cert_file,
        key_file=connection.key_file,
    )
    with local_service(
        broker,
        db=connection.db,
        trust=connection.trust,
        threshold=connection.threshold,
        timeout=connection.connect_timeout,
    ) as service:
        yield service


def read_artifact(path: Path) -> bytes:
    """Read a ``.fedge`` file to upload.

    Raises:
        ArtifactError: not a regular file, unreadable, or over
            :data:`MAX_ARTIFACT_BYTES`.
    """
    return read_bounded(path, max_bytes=MAX_ARTIFACT_BYTES, error=ArtifactError, what="artifact")


# --- the options --------------------------------------------------------------------


def _in_panel(option: Any) -> Any:
    """The same ``Annotated[type, typer.Option(...)]`` shown in the Connection panel."""
    base, info = get_args(option)
    info = copy(info)
    info.rich_help_panel = PANEL
    return Annotated[base, info]


def _option(*decls: str, **kwargs: Any) -> Any:
    return typer.Option(*decls, rich_help_panel=PANEL, **kwargs)


_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    (
        "api",
        Annotated[
            str | None,
            _option(
                "--api",
                envvar="FEDGE_API",
                show_default=False,
                help="The coordinator's HTTP API, https://host:port (or --broker).",
            ),
        ],
        None,
    ),
    (
        "token",
        Annotated[
            str | None,
            _option(
                "--token",
                envvar="FEDGE_TOKEN",
                show_default=False,
                help="API token for --api (better: set FEDGE_TOKEN).",
            ),
        ],
        None,
    ),
    (
        "api_timeout",
        Annotated[float, _option("--api-timeout", min=0.1, help="Seconds to wait for the API.")],
        DEFAULT_TIMEOUT_S,
    ),
    (
        "broker",
        Annotated[
            str | None,
            _option(
                "--broker",
                envvar="FEDGE_BROKER",
                show_default=False,
                help="Run in-process on this broker, mqtt://host:1883 (or --api).",
            ),
        ],
        None,
    ),
    (
        "db",
        Annotated[
            Path,
            _option(
                "--db", envvar="FEDGE_DB", dir_okay=False, help="State database with --broker."
            ),
        ],
        DEFAULT_DB,
    ),
    (
        "trust",
        Annotated[
            list[Path] | None,
            _option(
                "--trust",
                dir_okay=False,
                show_default=False,
                help="Public key uploads must be signed by, with --broker; repeatable.",
            ),
        ],
        None,
    ),
    (
        "threshold",
        Annotated[int, _option("--threshold", min=1, help="How many --trust keys must sign.")],
        1,
    ),
    ("username", _in_panel(UsernameOption), COORDINATOR_SENDER),
    ("password_file", _in_panel(PasswordFileOption), None),
    ("password", _in_panel(PasswordEnv), None),
    ("ca_file", _in_panel(CaOption), None),
    ("cert_file", _in_panel(CertOption), None),
    ("key_file", _in_panel(KeyOption), None),
    ("connect_timeout", _in_panel(ConnectTimeoutOption), 10.0),
)
"""``(parameter name, annotation, default)`` of every connection option."""

_NAMES = frozenset(name for name, _, _ in _OPTIONS)


def _chosen(api: str | None, broker: str | None) -> tuple[str | None, str | None]:
    """Keep one of ``--api`` and ``--broker`` (see the module docstring)."""
    ctx = click.get_current_context()
    if api and broker:
        api_from = ctx.get_parameter_source("api")
        broker_from = ctx.get_parameter_source("broker")
        if api_from is ParameterSource.COMMANDLINE and broker_from is not api_from:
            return api, None
        if broker_from is ParameterSource.COMMANDLINE and api_from is not broker_from:
            return None, broker
        raise click.UsageError(
            "give either --api URL (a coordinator service) or --broker URL (in-process), not both",
            ctx,
        )
    if not api and not broker:
        raise click.UsageError(
            "say where to run: --api URL (or FEDGE_API) for a coordinator service, "
            "or --broker URL (or FEDGE_BROKER) to run in-process",
            ctx,
        )
    return api or None, broker or None


def _connection(values: dict[str, Any]) -> Connection:
    api, broker = _chosen(values["api"], values["broker"])
    token = values["token"]
    if api is not None and not token:
        raise click.UsageError(
            "--api needs an API token: set FEDGE_TOKEN or pass --token",
            click.get_current_context(),
        )
    return Connection(
        api=api,
        token=token,
        api_timeout=values["api_timeout"],
        broker=broker,
        db=values["db"],
        trust=tuple(values["trust"] or ()),
        threshold=values["threshold"],
        username=values["username"],
        password=values["password"],
        password_file=values["password_file"],
        ca_file=values["ca_file"],
        cert_file=values["cert_file"],
        key_file=values["key_file"],
        connect_timeout=values["connect_timeout"],
    )


def with_connection(
    command: Callable[Concatenate[Connection, _P], None],
) -> Callable[_P, None]:
    """Add the connection options to a Typer command.

    The command's first parameter receives the :class:`Connection`; its other
    parameters are its own options and arguments. The returned function has
    those plus the connection options (keyword-only, in the "Connection" help
    panel) in its signature, which is what Typer reads.

    Raises:
        TypeError: the command has a parameter named like a connection option.
    """
    signature = inspect.signature(command, eval_str=True)
    own = list(signature.parameters.values())[1:]
    clash = _NAMES & {p.name for p in own}
    if clash:
        raise TypeError(f"{command.__name__} has parameters named like options: {sorted(clash)}")
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hint, default=default)
        for name, hint, default in _OPTIONS
    ]
    parameters = [*own, *added]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        values = {name: kwargs.pop(name) for name in _NAMES}
        command(_connection(values), *args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    return wrapper
