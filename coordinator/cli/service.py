"""``fedge coordinator``: run the coordinator service and manage its API tokens.

* ``init [PATH] [--force]`` writes the commented example configuration
  (:func:`~coordinator.service.config_reader.example_service_config`) to ``PATH``
  (default ``coordinator.toml``), refusing to overwrite an existing file without ``--force``,
  and says what to do next.
* ``serve`` runs the service (:func:`~coordinator.service.main.run_service`): the
  HTTP API, the MQTT connection, telemetry ingest, rollouts and federated runs,
  until SIGTERM or SIGINT (then it stops cleanly and exits 0). The configuration
  comes from ``--config`` (default: ``./coordinator.toml`` when it exists) and the
  flags, a flag beating the file
  (:func:`~coordinator.service.config_reader.build_service_config` has the rules). Its
  flags are those of the config keys, declared from
  :data:`~coordinator.service.config_schema.SERVICE_SCHEMA` by
  :mod:`coordinator.cli.config_flags` (only ``--config`` is declared here); the
  flags alone are enough::

      fedge coordinator serve --db state.db --embedded-broker --dev --trust keys/signing.pub

  The embedded broker is anonymous and has no ACL: it is refused without
  ``--dev`` (``dev = true``).

  The broker password comes from ``--password-file``, the file's
  ``password_file``, or ``FEDGE_BROKER_PASSWORD``. Logs go to stdout.
* ``token create --role viewer|operator [--name NAME] [--expires-in 30d]`` makes an
  API token and prints it once, alone on stdout (``TOKEN=$(fedge coordinator token
  create ...)`` works; the explanation goes to stderr); only its hash is stored.
  With ``--expires-in`` the service refuses it (401, like an unknown token) from
  then on; without it the token never expires (:data:`RECOMMENDED_LIFETIME` is
  the lifetime the docs recommend).
  ``token list [--json]`` shows every token (never the secret) with its expiry, ``token revoke ID``
  revokes one: the running service refuses it from the next request on. They work
  on ``--db``, or the database the config file names, while the service runs.

Errors (a bad configuration, an unreadable key, a busy port, an unreachable broker)
print one line ``error: ...`` on stderr and exit with status 1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from compress.fileio import atomic_write
from coordinator.cli.config_flags import ConfigFlags, with_config_flags
from coordinator.cli.options import JsonOption
from coordinator.cli.output import console, err_console, print_json, reported_errors
from coordinator.cli.views import safe_text
from coordinator.errors import RolloutError, ServiceConfigError
from coordinator.rollout.policy import parse_duration
from coordinator.service.config import PASSWORD_ENV, ServiceConfig
from coordinator.service.config_reader import (
    build_service_config,
    example_service_config,
    store_location,
)
from coordinator.service.config_schema import SERVICE_SCHEMA
from coordinator.service.main import configure_logging, run_service
from coordinator.service.operations import CLI_ACTOR
from coordinator.service.store import Store, TokenRow
from coordinator.service.tokens import Role
from edge_agent.config.agent import load_config_file

app = typer.Typer(
    help="Run the coordinator service (HTTP API + MQTT) and manage its API tokens.",
    no_args_is_help=True,
)
token_app = typer.Typer(
    help="Create, list and revoke API tokens of the coordinator's HTTP API.",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")

DEFAULT_CONFIG = Path("coordinator.toml")
"""The config file ``init`` writes and the other commands read when no --config is given."""

MAX_NAME_CHARS = 100
"""Longest token name."""

RECOMMENDED_LIFETIME = "90d"
"""The ``--expires-in`` the docs recommend for tokens of people and scripts."""

# Config key -> the flag that overrides it (also how messages name the value's source);
# declared with each key in the schema.
_FLAGS = SERVICE_SCHEMA.flags()

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        show_default=False,
        dir_okay=False,
        help=f"Config file (TOML). Default: ./{DEFAULT_CONFIG} if it exists.",
    ),
]
DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db", show_default=False, dir_okay=False, help="SQLite database (overrides the file's)."
    ),
]


def _read_config(path: Path | None) -> tuple[dict[str, Any], Path | None]:
    """The config file's values (``{}`` without one) and its path.

    Raises:
        ConfigError: an explicit file that is missing, or any unreadable or invalid one.
    """
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return (load_config_file(path) if path is not None else {}), path


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"broker.url": v}`` -> ``{"broker": {"url": v}}``, dropping None values."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name] = value
    return nested


def _sources(path: Path | None) -> dict[str, Any]:
    """Keyword arguments of the config builders that describe the file."""
    return {
        "base_dir": path.parent if path is not None else Path.cwd(),
        "file_label": str(path) if path is not None else None,
        "override_labels": _FLAGS,
    }


@app.command()
def init(
    path: Annotated[
        Path, typer.Argument(dir_okay=False, help="Where to write the config file.")
    ] = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example config file to edit, and say what comes next."""
    with reported_errors():
        try:
            atomic_write(path, example_service_config().encode(), mode=0o644, overwrite=force)
        except FileExistsError:
            raise ServiceConfigError(
                f"{path} already exists; pass --force to overwrite it"
            ) from None
        except OSError as exc:
            raise ServiceConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    keys = path.parent / "keys"
    config = "" if path == DEFAULT_CONFIG else f" --config {path}"
    console.print(f"wrote {path}", highlight=False, markup=False)
    console.print(
        "next steps:\n"
        f"  1. fedge keys generate --out {keys}\n"
        f"     (the key that signs your models; [trust] keys names {keys / 'signing.pub'})\n"
        f"  2. edit {path}: db, [broker] (your broker's url and password_file)\n"
        "     and [trust]; to try fedge on this machine instead, serve with\n"
        "     --embedded-broker --dev (an anonymous broker, no ACL)\n"
        f"  3. fedge coordinator token create --role operator{config}\n"
        f"  4. fedge coordinator serve{config}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _service_config(config: Path | None, flags: dict[str, Any]) -> ServiceConfig:
    """The merged configuration of ``serve``.

    Raises:
        ConfigError: an unreadable or invalid config file.
        ServiceConfigError: an invalid merged configuration.
    """
    file_values, path = _read_config(config)
    return build_service_config(
        file_values,
        _nest(flags),
        password=os.environ.get(PASSWORD_ENV) or None,
        **_sources(path),
    )


@app.command()
@with_config_flags(SERVICE_SCHEMA)
def serve(flags: ConfigFlags, config: ConfigOption = None) -> None:
    """Run the coordinator service until SIGTERM or SIGINT.

    Serves the HTTP API (docs at /docs), keeps the fleet's state in SQLite, ingests
    telemetry and drives rollouts and federated runs over MQTT. Flags override the
    config file.
    """
    with reported_errors():
        settings = _service_config(config, flags)
    configure_logging(settings.log_level)
    with reported_errors():
        run_service(settings)


# --------------------------------------------------------------------------- tokens


@contextmanager
def _token_store(db: Path | None, config: Path | None, *, create: bool) -> Iterator[Store]:
    """The store that ``--db`` or the config file names, closed on exit.

    Raises:
        ConfigError: an unreadable or invalid config file.
        ServiceConfigError: no database named, or (unless ``create``) none there.
        StoreError: the database cannot be opened.
    """
    file_values, path = _read_config(config)
    db_path, artifact_dir = store_location(file_values, _nest({"db": db}), **_sources(path))
    if not create and not db_path.exists():
        raise ServiceConfigError(
            f"no database at {db_path} (fedge coordinator serve or token create makes it)"
        )
    store = Store.open(db_path, artifact_dir=artifact_dir)
    try:
        yield store
    finally:
        store.close()


def _when(at: float | None, never: str = "-") -> str:
    """A time in UTC to the minute, for tables."""
    if at is None:
        return never
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%MZ")


def _check_name(name: str) -> str:
    """A token name: 1-100 printable characters.

    Raises:
        ServiceConfigError: empty, too long or with control characters.
    """
    if not name.strip() or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ServiceConfigError(
            f"--name must be 1-{MAX_NAME_CHARS} printable characters, got {name[:40]!r}"
        )
    return name.strip()


def parse_lifetime(text: str) -> float:
    """An ``--expires-in`` value in seconds: a positive duration (``90s``, ``12h``, ``30d``).

    Raises:
        ServiceConfigError: not a duration, or zero.
    """
    try:
        seconds = parse_duration(text)
    except RolloutError as exc:
        raise ServiceConfigError(f"--expires-in: {exc}") from exc
    if seconds <= 0:
        raise ServiceConfigError(f"--expires-in must be a positive duration, got {text!r}")
    return seconds


@token_app.command("create")
def token_create(
    role: Annotated[
        Role,
        typer.Option(
            "--role",
            show_default=False,
            case_sensitive=False,
            help="viewer: read only. operator: also upload, roll out, start runs.",
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name", show_default=False, help="What it is for (shown in lists and the audit log)."
        ),
    ] = None,
    expires_in: Annotated[
        str | None,
        typer.Option(
            "--expires-in",
            show_default=False,
            metavar="DURATION",
            help=(
                "Refuse the token after this long: 90s, 12h, 30d. Default: never "
                f"(recommended: {RECOMMENDED_LIFETIME}, or less)."
            ),
        ),
    ] = None,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Create an API token and print it, once, alone on stdout.

    Only its hash is stored: keep the printed token. Use it as
    "Authorization: Bearer <token>".
    """
    with reported_errors():
        label = _check_name(name if name is not None else role.value)
        lifetime = None if expires_in is None else parse_lifetime(expires_in)
        with _token_store(db, config, create=True) as store:
            now = time.time()
            expires_at = None if lifetime is None else now + lifetime
            row, plaintext = store.add_token(label, role, now, expires_at=expires_at)
            store.audit(
                CLI_ACTOR.name,
                CLI_ACTOR.role,
                "token.create",
                row.token_id,
                detail={"name": row.name, "role": row.role.value, "expires_at": expires_at},
                at=now,
            )
    typer.echo(plaintext)
    expiry = "never expires" if expires_at is None else f"expires {_when(expires_at)}"
    err_console.print(
        f"created {row.role.value} token {row.token_id} ({safe_text(row.name)}); it {expiry}. "
        "It is shown "
        "only this once: keep it secret. Send it as 'Authorization: Bearer <token>'; "
        f"revoke it with: fedge coordinator token revoke {row.token_id}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _token_json(row: TokenRow, now: float) -> dict[str, Any]:
    return {
        "token_id": row.token_id,
        "name": row.name,
        "role": row.role.value,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "revoked_at": row.revoked_at,
        "revoked": row.revoked_at is not None,
        "expires_at": row.expires_at,
        "expired": row.expired(now),
    }


@token_app.command("list")
def token_list(
    db: DbOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """List every token (revoked and expired ones too): id, name, role, last used,
    expiry and state (active, expired, revoked). --json adds the creation and
    revocation times."""
    with reported_errors(as_json=as_json), _token_store(db, config, create=False) as store:
        rows = store.tokens()
    now = time.time()
    if as_json:
        print_json({"tokens": [_token_json(row, now) for row in rows]})
        return
    if not rows:
        err_console.print("no tokens; make one with: fedge coordinator token create --role ...")
        return
    table = Table(title="API tokens (times in UTC)", title_justify="left")
    for column in ("ID", "NAME", "ROLE", "LAST USED", "EXPIRES", "STATE"):
        table.add_column(column, no_wrap=column in {"ID", "ROLE", "STATE"}, overflow="fold")
    for row in rows:
        state = _token_state(row, now)
        table.add_row(
            Text(row.token_id),
            Text(safe_text(row.name)),
            Text(row.role.value, style="bold" if row.role is Role.OPERATOR else ""),
            Text(_when(row.last_used_at, "never")),
            Text(_when(row.expires_at, "never")),
            Text(state, style="" if state == "active" else "red"),
        )
    console.print(table)


def _token_state(row: TokenRow, now: float) -> str:
    """``revoked``, ``expired`` or ``active``."""
    if row.revoked_at is not None:
        return "revoked"
    return "expired" if row.expired(now) else "active"


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[
        str, typer.Argument(metavar="ID", show_default=False, help="The token's id (token list).")
    ],
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Revoke a token: the service refuses it (401) from the next request on."""
    with reported_errors(), _token_store(db, config, create=False) as store:
        now = time.time()
        before = store.token(token_id)
        row = store.revoke_token(token_id, now)  # NotFoundError for an unknown id
        if before is not None and before.revoked_at is None:
            store.audit(
                CLI_ACTOR.name, CLI_ACTOR.role, "token.revoke", row.token_id, at=now,
                detail={"name": row.name},
            )  # fmt: skip
    if before is not None and before.revoked_at is not None:
        console.print(
            f"token {row.token_id} ({safe_text(row.name)}) was already revoked "
            f"at {_when(row.revoked_at)}",
            highlight=False,
            markup=False,
        )
        return
    console.print(
        f"revoked token {row.token_id} ({safe_text(row.name)})", highlight=False, markup=False
    )
