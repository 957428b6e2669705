"""``fedge-agent``: the device-side command line (argparse only: no extra dependencies).

Commands:

* ``fedge-agent init [PATH] [--force]`` writes the commented example configuration
  (:func:`edge_agent.config.agent.example_config`, generated from the schema) to
  ``PATH`` (default ``agent.toml``, mode 0600 since a password may go in it),
  refusing to overwrite an existing file without ``--force`` (exit status 1), and
  says what to edit next.
* ``fedge-agent run [--config FILE] [flags]`` runs the agent until SIGTERM or SIGINT.
  The configuration comes from the TOML file (``--config``; without it
  ``./agent.toml`` when it exists) and the flags, a flag beating the file and the
  file beating the default (:func:`edge_agent.config.agent.build_config` has the rules).
  Each flag that overrides a config key is declared from that key's entry in
  :data:`~edge_agent.config.agent_schema.AGENT_SCHEMA` (name, metavar, type, help).
  The broker password comes from ``--password-file``, else the file's
  ``password``/``password_file``, else the ``FEDGE_AGENT_PASSWORD`` environment
  variable. Before starting, the trusted keys, the TLS files and the preferred
  runtime are checked; any configuration error prints ``error: <one line>`` and
  exits with status 2, like bad usage. Without ``-v`` the config's ``log_level``
  applies. :func:`config_from_args` does the merging (the only place that reads the
  environment), so it can be tested without starting an agent.
* ``fedge-agent verify ARTIFACT --trust KEY.pub`` applies the device's trust rules to
  an artifact file exactly as an install would (threshold signatures, expiry, rollback
  against ``--installed-version``, device fit against ``--runtime`` (default: the
  runtimes installed here) and ``--tag``, then
  payload length and sha256), and prints ``verified`` or a one-line reason with exit
  status 1. Useful for checking a key or an artifact on a device by hand.
* ``fedge-agent enroll --token T --coordinator URL --device-id ID [--out DIR]
  [--force] [--certificate]`` enrolls this device with a one-time token from
  ``fedge device enroll ID``: makes its broker password (or, with
  ``--certificate``, a key pair and a CSR) here, receives the broker settings, the
  signed key set and the fleet id, and writes a ready ``DIR/agent.toml`` (default
  ``DIR`` is the current directory; see :mod:`edge_agent.enroll`). Prints the
  ``fedge-agent run`` command to start it; a refusal is one line and exit status 1.
* ``fedge-agent --version``.

Logging goes to stderr (``-v`` for info, ``-vv`` for debug); errors from ``compress`` and
``edge_agent`` become one line and exit status 1; bad usage and bad configuration exit
with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.artifact import load_artifact
from compress.errors import CompressError
from compress.fileio import atomic_write
from compress.keys import load_public_key
from compress.signing import TrustedKeys
from compress.trust import DeviceProfile
from edge_agent import __version__
from edge_agent.agent import run_agent
from edge_agent.config.agent import AgentConfig, build_config, example_config, load_config_file
from edge_agent.config.agent_schema import AGENT_SCHEMA
from edge_agent.config.schema import Key
from edge_agent.enroll import enroll
from edge_agent.errors import AgentError, ConfigError
from edge_agent.ota.installer import Checkpoint
from edge_agent.runtime.loader import available_runtimes
from edge_agent.serving.http_access import http_config

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_CONFIG = Path("agent.toml")
"""The config file ``init`` writes and ``run`` reads when no ``--config`` is given."""

PASSWORD_ENV = "FEDGE_AGENT_PASSWORD"  # noqa: S105 (a variable name, not a secret)
"""Environment variable holding the broker password when no other source gives one."""

_VERBOSITY = (logging.WARNING, logging.INFO, logging.DEBUG)

# Config key -> the flag that overrides it (also how messages name the value's source);
# declared with each key in the schema.
_FLAGS = AGENT_SCHEMA.flags()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedge-agent``."""
    parser = argparse.ArgumentParser(
        prog="fedge-agent",
        description="fedge device agent: verifies, installs and serves signed models.",
    )
    parser.add_argument("--version", action="version", version=f"fedge-agent {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v info, -vv debug logs (stderr)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="check an artifact file against this device's trust rules",
        description="Apply the device's trust rules to an artifact file, as an install would.",
    )
    verify.add_argument("artifact", type=Path, help="the .fedge artifact file")
    verify.add_argument(
        "--trust", type=Path, action="append", required=True, metavar="KEY.pub",
        help="trusted public key file (repeatable)",
    )  # fmt: skip
    verify.add_argument(
        "--threshold", type=int, default=1, help="signatures required, k of n (default 1)"
    )
    verify.add_argument(
        "--installed-version", type=int, default=None, metavar="N",
        help="highest version installed before: the artifact must be newer",
    )  # fmt: skip
    verify.add_argument(
        "--runtime", action="append", default=None, metavar="NAME",
        help="runtime this device has (repeatable; default: the ones installed here)",
    )  # fmt: skip
    verify.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="hardware tag (repeatable)"
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")

    init = commands.add_parser(
        "init",
        help="write a commented example config file",
        description="Write a commented example configuration to edit.",
    )
    init.add_argument(
        "path", type=Path, nargs="?", default=DEFAULT_CONFIG,
        help=f"where to write it (default {DEFAULT_CONFIG})",
    )  # fmt: skip
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    enroll = commands.add_parser(
        "enroll",
        help="enroll this device with a one-time token and write its agent.toml",
        description=(
            "Enroll this device: make its broker password here, redeem the token from "
            "`fedge device enroll ID`, write a ready agent.toml."
        ),
    )
    enroll.add_argument("--token", required=True, help="the one-time enrollment token")
    enroll.add_argument(
        "--coordinator", required=True, metavar="URL",
        help="the coordinator API's URL (https://HOST:PORT)",
    )  # fmt: skip
    enroll.add_argument("--device-id", required=True, metavar="ID", help="this device's id")
    enroll.add_argument(
        "--out", type=Path, default=Path(), metavar="DIR",
        help="where to write agent.toml and the credentials (default: here)",
    )  # fmt: skip
    enroll.add_argument("--force", action="store_true", help="replace an existing agent.toml")
    enroll.add_argument(
        "--certificate", action="store_true",
        help="enroll for mutual TLS: make a key pair here and send a CSR, not a password",
    )  # fmt: skip

    run = commands.add_parser(
        "run",
        help="run the agent (until SIGTERM or SIGINT)",
        description=(
            "Run the agent. Flags override the config file; relative paths in flags are "
            f"relative to the current directory. The broker password is read from "
            f"--password-file, the config file, or ${PASSWORD_ENV}."
        ),
    )
    _add_run_arguments(run)
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="-v info, -vv debug logs (stderr); overrides log_level",
    )  # fmt: skip
    run.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help=f"config file (default: ./{DEFAULT_CONFIG} if it exists)",
    )  # fmt: skip
    for key in AGENT_SCHEMA.keys.values():
        if key.flag is not None:
            _add_config_flag(run, key.flag, key)


def _add_config_flag(run: argparse.ArgumentParser, flag: str, key: Key) -> None:
    """The flag of one config key, declared from its schema entry (help, metavar, type)."""
    run.add_argument(
        flag,
        type=key.flag_type(),
        action="append" if key.repeatable else "store",
        default=None,
        metavar=key.metavar,
        help=key.flag_help().replace("%", "%%"),
    )


def _verify(args: argparse.Namespace) -> int:
    try:
        trusted = TrustedKeys.of((load_public_key(p) for p in args.trust), args.threshold)
        device = DeviceProfile(
            runtimes=frozenset(args.runtime) if args.runtime else available_runtimes(),
            hardware_tags=frozenset(args.tag),
        )
        result = load_artifact(
            args.artifact,
            trusted,
            now=datetime.now(UTC),
            installed_version=args.installed_version,
            device=device,
        )
    except (CompressError, AgentError) as exc:
        logger.debug("verification failed", exc_info=exc)
        if args.json:
            print(json.dumps({"ok": False, "error": {"code": exc.code, "message": str(exc)}}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({"ok": True, "verified": True, "manifest": result.manifest.to_dict()}))
    else:
        print(f"verified: {result.manifest.summary()}")
    return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    path: Path = args.path
    try:
        atomic_write(path, example_config().encode(), mode=0o600, overwrite=args.force)
    except FileExistsError:
        print(f"error: {path} already exists; pass --force to overwrite it", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {path}")
    print(
        "next: set device_id, [broker] url and [trust] keys (copy the operator's release "
        "public key to this device), then run:"
    )
    print(f"  fedge-agent run --config {path}")
    return EXIT_OK


def _enroll(args: argparse.Namespace) -> int:
    try:
        enrolled = enroll(
            args.coordinator,
            args.token,
            args.device_id,
            args.out,
            force=args.force,
            certificate=args.certificate,
        )
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    fleet = f", fleet {enrolled.fleet}" if enrolled.fleet else ""
    print(f"enrolled {args.device_id}: broker {enrolled.broker_url}{fleet}")
    print(f"start it: fedge-agent run --config {enrolled.config}")
    return EXIT_OK


def _file_gives_password(file_values: Mapping[str, Any]) -> bool:
    broker = file_values.get("broker")
    return isinstance(broker, Mapping) and ("password" in broker or "password_file" in broker)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> AgentConfig:
    """Build the agent's configuration from ``run``'s arguments, its file and ``environ``.

    The config file is ``args.config``, else ``./agent.toml`` when it exists, else
    none. Flags beat the file, the file beats the defaults. ``FEDGE_AGENT_PASSWORD``
    in ``environ`` is the password when neither ``--password-file`` nor the file
    gives one.

    Args:
        args: Parsed ``fedge-agent run`` arguments.
        environ: The environment (``os.environ`` at the entry point).

    Returns:
        The validated configuration (key and TLS files not read yet).

    Raises:
        ConfigError: an explicit config file that is missing or invalid, or an
            invalid merged configuration; the message names the file or the flag.
    """
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    file_values = load_config_file(path) if path is not None else {}
    overrides: dict[str, Any] = {}
    labels = dict(_FLAGS)
    for key, flag in _FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        (overrides.setdefault(section, {}) if section else overrides)[name] = value
    password = environ.get(PASSWORD_ENV)
    if password and args.password_file is None and not _file_gives_password(file_values):
        overrides.setdefault("broker", {})["password"] = password
        labels["broker.password"] = PASSWORD_ENV
    return build_config(
        file_values,
        overrides,
        base_dir=path.parent if path is not None else Path.cwd(),
        file_label=str(path) if path is not None else None,
        override_labels=labels,
    )


def _preflight(config: AgentConfig) -> None:
    """Read what the config points at, so mistakes surface as config errors now.

    Raises:
        ConfigError: an unusable trusted key, key-set or TLS file, or a runtime not
            installed.
    """
    if config.trust.keyset is None:
        config.trust.load()
    else:  # verified on start, against the key set the device may have stored since
        config.trust.read_keyset()
    config.broker.check_files()
    http_config(config)  # the endpoint's own rules: loopback unless a token, a real port
    if config.runtime is not None:
        installed = available_runtimes()
        if config.runtime not in installed:
            raise ConfigError(
                f"runtime {config.runtime!r} is not installed here "
                f"(installed: {', '.join(sorted(installed)) or 'none'})"
            )


def _run(args: argparse.Namespace, checkpoint: Checkpoint | None) -> int:
    verbose: int = getattr(args, "verbose", 0)
    try:
        config = config_from_args(args, os.environ)
        _preflight(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    level = _VERBOSITY[min(verbose, 2)] if verbose else getattr(logging, config.log_level.upper())
    _configure_logging(level)
    logger.info("starting agent %s (broker %s)", config.device_id, config.broker.url)
    if checkpoint is None:
        return run_agent(config)
    return run_agent(config, checkpoint=checkpoint)


def _configure_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None, *, checkpoint: Checkpoint | None = None) -> int:
    """Console-script entry point; returns the exit status.

    ``checkpoint`` is for tests only (tests/agent_crash.py): a hook called at each
    named point of an install, which crash tests use to kill the agent there. The
    console script never passes one, and nothing in the environment sets one.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args, checkpoint)  # configures logging once the config's log_level is known
    _configure_logging(_VERBOSITY[min(args.verbose, 2)])
    if args.command == "verify":
        return _verify(args)
    if args.command == "init":
        return _init(args)
    if args.command == "enroll":
        return _enroll(args)
    parser.print_help()
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
