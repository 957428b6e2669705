"""Accounts in the broker's password file (``fedge broker add-user``).

mosquitto keeps its accounts in a password file of salted hashes that only its
own tool, ``mosquitto_passwd``, writes. :func:`add_account` runs it with the
password on stdin (never on a command line, where ``ps`` would show it) after
checking that the username is one fedge knows: a device id, ``coordinator`` (the
service) or an operator account ``coordinator@<name>``. Workflow::

    add_account(Path("/etc/fedge/broker/passwd"), "pi-7", secret)
    # then reload mosquitto (SIGHUP) or restart it: it reads the file at start

Adding an existing username replaces its password.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from compress.fileio import atomic_write
from coordinator.errors import BrokerSetupError
from edge_agent.errors import TopicError
from edge_agent.protocol import (
    COORDINATOR_SENDER,
    OPERATOR_SEPARATOR,
    is_valid_device_id,
    operator_account,
)

__all__ = ["MOSQUITTO_PASSWD", "add_account", "check_account_name"]

logger = logging.getLogger(__name__)

MOSQUITTO_PASSWD = "mosquitto_passwd"  # noqa: S105 - a tool name, not a secret
"""The tool that writes mosquitto password files (shipped with mosquitto)."""

TOOL_TIMEOUT_S = 30.0


def _fail(message: str) -> BrokerSetupError:
    logger.error("broker account refused: %s", message)
    return BrokerSetupError(message)


def check_account_name(username: str) -> str:
    """Return ``username`` if it is a device id, ``coordinator`` or ``coordinator@<name>``.

    Raises:
        BrokerSetupError: any other name (the ACL would not know what it may do).
    """
    prefix = f"{COORDINATOR_SENDER}{OPERATOR_SEPARATOR}"
    if username == COORDINATOR_SENDER or is_valid_device_id(username):
        return username
    if username.startswith(prefix):
        try:
            return operator_account(username[len(prefix) :])
        except TopicError as exc:
            raise _fail(str(exc)) from None
    raise _fail(
        f"unknown kind of account {username[:80]!r}: a device id (1-64 of [A-Za-z0-9_.-]), "
        f"{COORDINATOR_SENDER!r} or '{prefix}<name>'"
    )


def _tool() -> str:
    found = shutil.which(MOSQUITTO_PASSWD) or shutil.which(
        MOSQUITTO_PASSWD, path="/usr/bin:/usr/local/bin:/usr/sbin"
    )
    if found is None:
        raise _fail(f"{MOSQUITTO_PASSWD} is not installed (it comes with mosquitto)")
    return found


def add_account(passwords: Path, username: str, secret: str) -> None:
    """Add (or re-key) ``username`` in the mosquitto password file ``passwords``.

    The file is created empty (mode 0600) when missing.

    Raises:
        BrokerSetupError: an unknown kind of username, an empty password or one with a
            line break, ``mosquitto_passwd`` missing or failing.
    """
    check_account_name(username)
    if not secret or "\n" in secret or "\r" in secret:
        raise _fail("the password must be one non-empty line")
    tool = _tool()
    try:
        if not passwords.exists():
            atomic_write(passwords, b"", mode=0o600, overwrite=False)
        done = subprocess.run(  # noqa: S603 - a fixed tool, arguments checked above
            [tool, str(passwords), username],
            input=f"{secret}\n{secret}\n".encode(),
            capture_output=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _fail(f"{MOSQUITTO_PASSWD} on {passwords} failed: {exc}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise _fail(f"{MOSQUITTO_PASSWD} on {passwords} failed: {said[-1] if said else done}")
    logger.info("account %s set in %s", username, passwords)
