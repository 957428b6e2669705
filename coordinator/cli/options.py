"""The options the fleet commands share, declared once.

Two decorators add them to a Typer command and hand the command one
:class:`Connection` (its first parameter) instead of a dozen keyword arguments:

* :func:`with_connection` -- where the command's operations run: ``--api URL``
  (``FEDGE_API``) with ``--token`` (``FEDGE_TOKEN``), or in-process with
  ``--broker URL`` (``FEDGE_BROKER``), ``--db`` (``FEDGE_DB``, default
  :data:`DEFAULT_DB` in the current directory), ``--trust``, ``--threshold`` and the
  broker's credentials. Exactly one of ``--api`` and ``--broker`` must be given:
  when one comes from the command line and the other from the environment, the
  command line wins (so an exported ``FEDGE_BROKER`` does not get in the way of
  ``--api``); both from the same place, or neither, is a usage error (exit status 2).
  ``--api`` needs a token. :mod:`coordinator.cli.operate` turns the connection into
  an :class:`~coordinator.service.operations.Operations` object.
  :func:`with_snapshot_connection` is the same with a temporary database as the
  default of ``--db``, for commands that keep nothing (``fedge devices``, ``deploy``,
  ``rollback``). :func:`with_optional_connection` gives None instead of a usage
  error when neither is given (commands with an offline mode).
* :func:`with_api` -- ``--api`` and ``--token`` only, both required: commands only
  a service can do (``fedge device``).
* :func:`with_broker` -- commands that talk to the broker directly (``fedge train``):
  ``--broker`` (required) and the same credentials.

The broker's credentials (``--username``, ``--password-file`` or
``FEDGE_BROKER_PASSWORD``, ``--ca-file``, ``--cert-file``, ``--key-file``,
``--connect-timeout``) are declared once, in :data:`_CREDENTIALS`; every option
shows in the help's "Connection" panel. :meth:`Connection.broker_config` reads the
password file and builds the :class:`~edge_agent.config.agent.BrokerConfig`.

``--json`` (:data:`JsonOption`) and ``--to`` (:data:`TargetOption`) are shared too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Concatenate, ParamSpec, TypeVar

import click
import typer
from click.core import ParameterSource

from compress.fileio import read_bounded
from coordinator.service.api_client import DEFAULT_TIMEOUT_S
from edge_agent.config.agent import BrokerConfig
from edge_agent.errors import ConfigError
from edge_agent.protocol import COORDINATOR_SENDER

__all__ = [
    "DEFAULT_DB",
    "MAX_PASSWORD_FILE_BYTES",
    "PANEL",
    "ArtifactArgument",
    "Connection",
    "JsonOption",
    "TargetOption",
    "adding_options",
    "with_api",
    "with_broker",
    "with_connection",
    "with_optional_connection",
    "with_snapshot_connection",
]

DEFAULT_DB = Path("fedge-coordinator.db")
"""The in-process mode's state when neither ``--db`` nor ``FEDGE_DB`` is given."""

MAX_PASSWORD_FILE_BYTES = 4096
"""Largest ``--password-file`` read."""

PANEL = "Connection"
"""Help panel of the connection options."""

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
TargetOption = Annotated[
    str,
    typer.Option("--to", help="Which devices: all, device:ID[,ID...] or tag:TAG."),
]
ArtifactArgument = Annotated[
    str,
    typer.Argument(
        help="A signed .fedge file (uploaded first) or an uploaded artifact's sha256.",
        show_default=False,
    ),
]

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Connection:
    """Where a command runs (the connection options' values).

    Attributes:
        api: The coordinator API's URL (remote mode), or None.
        token: The API token (remote mode).
        api_timeout: Seconds to wait for each step of an API request.
        broker: The broker's URL (in-process mode, or a broker command), or None.
        db: The in-process service's SQLite state (None: a temporary one).
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
    db: Path | None = DEFAULT_DB
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
        if self.db is None:
            return f"{what} ended with this command (its database was temporary)"
        return (
            f"{what} is saved in {self.db}; it resumes when a coordinator "
            "(fedge coordinator serve, or another command) opens that database"
        )

    def broker_config(self) -> BrokerConfig:
        """The broker settings of these options (reads ``--password-file``).

        Raises:
            ConfigError: no broker, a bad URL or an unreadable password file.
        """
        if self.broker is None:
            raise ConfigError("no broker: give --broker URL")
        password = self.password
        if self.password_file is not None:
            raw = read_bounded(
                self.password_file,
                max_bytes=MAX_PASSWORD_FILE_BYTES,
                error=ConfigError,
                what="password",
            )
            password = raw.decode(errors="replace").strip()
        return BrokerConfig.from_url(
            self.broker,
            username=self.username,
            password=password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )


# --- the options --------------------------------------------------------------------


def _option(*decls: str, **kwargs: Any) -> Any:
    return typer.Option(*decls, rich_help_panel=PANEL, **kwargs)


_Declared = tuple[tuple[str, Any, Any], ...]
"""``(parameter name, annotation, default)`` of options a decorator adds."""

_API: _Declared = (
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
)

_BROKER_URL = "Broker URL: mqtt://host:1883 or mqtts://host:8883"

_IN_PROCESS: _Declared = (
    (
        "broker",
        Annotated[
            str | None,
            _option(
                "--broker",
                envvar="FEDGE_BROKER",
                show_default=False,
                help=f"{_BROKER_URL}: run in-process on it (or --api).",
            ),
        ],
        None,
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
)

_KEPT_DB: _Declared = (
    (
        "db",
        Annotated[
            Path,
            _option(
                "--db",
                envvar="FEDGE_DB",
                dir_okay=False,
                help="State database with --broker (kept: a rollout or run started here "
                "resumes when a coordinator next opens it).",
            ),
        ],
        DEFAULT_DB,
    ),
)

_TEMPORARY_DB: _Declared = (
    (
        "db",
        Annotated[
            Path | None,
            _option(
                "--db",
                envvar="FEDGE_DB",
                dir_okay=False,
                show_default=False,
                help="State database with --broker. Default: a temporary one, removed when "
                "the command ends (the devices are those the broker holds a status of).",
            ),
        ],
        None,
    ),
)

_REQUIRED_BROKER: _Declared = (
    (
        "broker",
        Annotated[
            str,
            _option("--broker", envvar="FEDGE_BROKER", show_default=False, help=f"{_BROKER_URL}."),
        ],
        inspect.Parameter.empty,
    ),
)

_CREDENTIALS: _Declared = (
    (
        "username",
        Annotated[
            str, _option("--username", help="MQTT username (the broker ACL's coordinator account).")
        ],
        COORDINATOR_SENDER,
    ),
    (
        "password_file",
        Annotated[
            Path | None,
            _option(
                "--password-file",
                help="File holding the MQTT password (or set FEDGE_BROKER_PASSWORD).",
                dir_okay=False,
            ),
        ],
        None,
    ),
    (
        "password",
        Annotated[str | None, _option("--password", envvar="FEDGE_BROKER_PASSWORD", hidden=True)],
        None,
    ),
    ("ca_file", Annotated[Path | None, _option("--ca-file", help="CA bundle for mqtts://.")], None),
    (
        "cert_file",
        Annotated[Path | None, _option("--cert-file", help="Client certificate (mTLS).")],
        None,
    ),
    ("key_file", Annotated[Path | None, _option("--key-file", help="Client key (mTLS).")], None),
    (
        "connect_timeout",
        Annotated[
            float, _option("--connect-timeout", min=0.1, help="Seconds to wait for the broker.")
        ],
        10.0,
    ),
)

_CONNECTION = _API + _IN_PROCESS + _KEPT_DB + _CREDENTIALS
_SNAPSHOT_CONNECTION = _API + _IN_PROCESS + _TEMPORARY_DB + _CREDENTIALS
_BROKER = _REQUIRED_BROKER + _CREDENTIALS


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
    api, broker = _chosen(values.pop("api"), values.pop("broker"))
    token = values["token"]
    if api is not None and not token:
        raise click.UsageError(
            "--api needs an API token: set FEDGE_TOKEN or pass --token",
            click.get_current_context(),
        )
    values["trust"] = tuple(values["trust"] or ())
    return Connection(api=api, broker=broker, **values)


def adding_options(
    declared: _Declared, build: Callable[[dict[str, Any]], _T]
) -> Callable[[Callable[Concatenate[_T, _P], None]], Callable[_P, None]]:
    """A decorator adding the ``declared`` options, their values built into one object.

    The command's first parameter receives what ``build`` makes of the added
    options' values, by parameter name (here a :class:`Connection`; the config
    flags of :mod:`coordinator.cli.config_flags` too); its other
    parameters are its own options and arguments. The returned function has
    those plus the added options (keyword-only) in its signature, which is what
    Typer reads.
    """
    names = frozenset(name for name, _, _ in declared)

    def decorate(command: Callable[Concatenate[_T, _P], None]) -> Callable[_P, None]:
        signature = inspect.signature(command, eval_str=True)
        own = list(signature.parameters.values())[1:]
        clash = names & {p.name for p in own}
        if clash:
            raise TypeError(
                f"{command.__name__} has parameters named like options: {sorted(clash)}"
            )
        keyword = inspect.Parameter.KEYWORD_ONLY
        added = [
            inspect.Parameter(name, keyword, annotation=hint, default=default)
            for name, hint, default in declared
        ]
        parameters = [*own, *added]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            values = {name: kwargs.pop(name) for name in names}
            command(build(values), *args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
        return wrapper

    return decorate


with_connection = adding_options(_CONNECTION, _connection)
"""Add ``--api``/``--token`` or ``--broker``/``--db``/``--trust`` and the credentials.

Raises:
    TypeError: the command has a parameter named like a connection option.
"""


def _optional_connection(values: dict[str, Any]) -> Connection | None:
    if not values["api"] and not values["broker"]:
        return None
    return _connection(values)


with_optional_connection = adding_options(_CONNECTION, _optional_connection)
"""Like :func:`with_connection`, but without ``--api`` or ``--broker`` the command
gets None (for commands that also work offline: ``fedge model lineage --dir``).

Raises:
    TypeError: the command has a parameter named like a connection option.
"""

with_snapshot_connection = adding_options(_SNAPSHOT_CONNECTION, _connection)
"""Like :func:`with_connection`, but in-process without ``--db`` the service runs on
a temporary database (``Connection.db`` is None): for commands that leave no file
behind (``fedge devices``, ``deploy``, ``rollback``).

Raises:
    TypeError: the command has a parameter named like a connection option.
"""


def _api_connection(values: dict[str, Any]) -> Connection:
    if not values["api"] or not values["token"]:
        raise click.UsageError(
            "this command runs through a coordinator service: give --api URL (or FEDGE_API) "
            "and an operator token (--token or FEDGE_TOKEN)",
            click.get_current_context(),
        )
    return Connection(**values)


with_api = adding_options(_API, _api_connection)
"""Add ``--api``, ``--token`` and ``--api-timeout`` only, both required: for commands
only the service can do (``fedge device``: it holds the broker's accounts).

Raises:
    TypeError: the command has a parameter named like a connection option.
"""

with_broker = adding_options(_BROKER, lambda values: Connection(**values))
"""Add ``--broker`` (required) and the broker's credentials.

Raises:
    TypeError: the command has a parameter named like a connection option.
"""
