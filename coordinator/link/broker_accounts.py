"""Accounts in the broker's password file (``fedge broker add-user``).

mosquitto keeps its accounts in a password file of salted hashes that only its
own tool, ``mosquitto_passwd``, writes. :func:`add_account` runs it with the
password on stdin (never on a command line, where ``ps`` would show it) after
checking that the username is one fedge knows: a device id, ``coordinator`` (the
service) or an operator account ``coordinator@<name>``. Workflow::

    add_account(Path("/etc/fedge/broker/passwd"), "pi-7", secret)
    # then reload mosquitto (SIGHUP) or restart it: it reads the file at start

Adding an existing username replaces its password. :func:`remove_account` deletes
an account (``mosquitto_passwd -D``); :func:`reload_broker` sends mosquitto SIGHUP
through its pid file (``fedge broker config`` writes ``pid_file``). On that reload
mosquitto 2.0 re-checks every connected client against the new password file and
disconnects those it no longer knows, so a removed device is cut off at once and
cannot reconnect (``tests/test_enrollment_mqtt.py`` shows it on a real broker).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
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

__all__ = [
    "MOSQUITTO_PASSWD",
    "add_account",
    "check_account_name",
    "reload_broker",
    "remove_account",
]

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
    try:
        if not passwords.exists():
            atomic_write(passwords, b"", mode=0o600, overwrite=False)
    except OSError as exc:
        raise _fail(f"cannot create {passwords}: {exc}") from None
    _run_tool(passwords, [str(passwords), username], f"{secret}\n{secret}\n".encode())
    logger.info("account %s set in %s", username, passwords)


def remove_account(passwords: Path, username: str) -> bool:
    """Delete ``username`` from the mosquitto password file ``passwords``.

    Returns:
        Whether the file held the account (removing a missing one is no error).

    Raises:
        BrokerSetupError: an unknown kind of username, a missing password file,
            ``mosquitto_passwd`` missing or failing.
    """
    check_account_name(username)
    if not passwords.is_file():
        raise _fail(f"no password file {passwords}")
    try:
        held = any(
            line.split(":", 1)[0] == username
            for line in passwords.read_text(errors="replace").splitlines()
        )
    except OSError as exc:
        raise _fail(f"cannot read {passwords}: {exc}") from None
    if held:
        _run_tool(passwords, ["-D", str(passwords), username], None)
        logger.info("account %s removed from %s", username, passwords)
    return held


def _run_tool(passwords: Path, arguments: list[str], stdin: bytes | None) -> None:
    """Run ``mosquitto_passwd ARGUMENTS`` on ``passwords``; raise if it fails."""
    tool = _tool()
    try:
        done = subprocess.run(  # noqa: S603 - a fixed tool, arguments checked by the callers
            [tool, *arguments],
            input=stdin,
            capture_output=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _fail(f"{MOSQUITTO_PASSWD} on {passwords} failed: {exc}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise _fail(f"{MOSQUITTO_PASSWD} on {passwords} failed: {said[-1] if said else done}")


def reload_broker(pid_file: Path) -> int:
    """Make mosquitto re-read its password file, ACL and CRL: SIGHUP to its pid.

    Returns:
        The pid signalled.

    Raises:
        BrokerSetupError: the pid file is missing or malformed, or no such process.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot read the broker's pid from {pid_file}: {exc}") from None
    if pid <= 1:
        raise _fail(f"{pid_file} holds no usable pid ({pid})")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise _fail(f"cannot signal the broker (pid {pid} from {pid_file}): {exc}") from None
    logger.info("asked the broker (pid %d) to reload its accounts", pid)
    return pid
