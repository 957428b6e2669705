"""``fedge-agent``: the device-side command line (argparse only: no extra dependencies).

Commands:

* ``fedge-agent verify ARTIFACT --trust KEY.pub`` applies the device's trust rules to
  an artifact file exactly as an install would (threshold signatures, expiry, rollback
  against ``--installed-version``, device fit against ``--runtime`` (default: the
  runtimes installed here) and ``--tag``, then
  payload length and sha256), and prints ``verified`` or a one-line reason with exit
  status 1. Useful for checking a key or an artifact on a device by hand.
* ``fedge-agent --version``.

Logging goes to stderr (``-v`` for info, ``-vv`` for debug); errors from ``compress`` and
``edge_agent`` become one line and exit status 1; bad usage exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from compress.artifact import load_artifact
from compress.errors import CompressError
from compress.keys import load_public_key
from compress.signing import TrustedKeys
from compress.trust import DeviceProfile
from edge_agent import __version__
from edge_agent.errors import AgentError
from edge_agent.runtime.loader import available_runtimes

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1


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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "verify":
        return _verify(args)
    parser.print_help()
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
