"""Signing keys for the commands that sign, with the passwords of encrypted ones.

Every command that signs (``fedge model package``, ``fedge train --package``,
``fedge keys keyset-init``, ``fedge keys rotate``, ``fedge fleet publish`` and
``fedge deploy --fleet --statement-key``) takes ``--key PATH`` (or
``--sign PATH``) once per key and :data:`KeyPasswordFileOption`
(``--key-password-file FILE``), and loads its keys with :func:`load_signing_keys`
(``fedge keys id`` too, for an encrypted private key).
An unencrypted key loads as before; the password of an encrypted key
(``fedge keys generate --encrypt``) comes from, in this order:

1. ``--key-password-file FILE``: the file's first line (without its line ending). The
   file should be readable by its owner only; a looser mode is logged as a warning, as
   for key files. An unreadable file or an empty first line is an error.
2. the ``FEDGE_KEY_PASSWORD`` environment variable (:data:`KEY_UNLOCK_ENV`), like
   ``FEDGE_BROKER_PASSWORD`` for the broker (handy in CI; any process of the same user
   can read another's environment, so prefer the file or the prompt elsewhere).
3. a hidden prompt on the terminal, when standard input is one: each encrypted key is
   asked for by its path, so two key holders of a 2-of-n threshold type their own
   passwords.
4. otherwise the command fails with
   :class:`~compress.errors.KeyPasswordRequiredError` (exit status 1) saying how to
   give one: nothing waits for input that cannot come.

A password from a file or the environment is one password for the whole command: it
is tried on every key, and ignored by unencrypted ones. A wrong password is
:class:`~compress.errors.WrongKeyPasswordError`; nothing is signed. Keys are loaded
before any slow work (a federated run, quantization) so a password problem shows at
once.

:func:`new_key_password` gives ``fedge keys generate --encrypt`` its password from
the same sources, asking twice at a prompt. The coordinator service cannot ask: its
``[fleet] key_password_file`` names the password of encrypted statement keys.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from compress.errors import KeyPasswordRequiredError
from compress.keys import (
    MAX_KEY_PASSWORD_FILE_BYTES,
    SigningKey,
    load_signing_key,
    read_key_password_file,
)

__all__ = [
    "KEY_UNLOCK_ENV",
    "MAX_KEY_PASSWORD_FILE_BYTES",
    "KeyPasswordFileOption",
    "load_signing_keys",
    "new_key_password",
    "read_key_password_file",
]

logger = logging.getLogger(__name__)

KEY_UNLOCK_ENV = "FEDGE_KEY_PASSWORD"
"""Environment variable holding the password of encrypted signing keys."""


KeyPasswordFileOption = Annotated[
    Path | None,
    typer.Option(
        "--key-password-file",
        dir_okay=False,
        show_default=False,
        help="File whose first line is the password of encrypted signing keys (or set "
        f"{KEY_UNLOCK_ENV}; on a terminal you are asked).",
    ),
]


def _stdin_is_terminal() -> bool:
    """True when the command can ask for a password (tests replace it)."""
    return sys.stdin.isatty()


def _given_password(password_file: Path | None) -> bytes | None:
    """The password from ``--key-password-file`` or the environment, if any."""
    if password_file is not None:
        return read_key_password_file(password_file)
    from_env = os.environ.get(KEY_UNLOCK_ENV, "")
    return from_env.encode() if from_env else None


def _prompt(text: str, *, confirm: bool = False) -> bytes:
    value: str = typer.prompt(text, hide_input=True, confirmation_prompt=confirm, err=True)
    return value.encode()


def load_signing_keys(paths: Sequence[Path], password_file: Path | None) -> list[SigningKey]:
    """Load the signing keys of one command, decrypting the encrypted ones.

    See the module docstring for where passwords come from.

    Raises:
        KeyPasswordRequiredError: a key is encrypted and there is no password and no
            terminal to ask on.
        WrongKeyPasswordError: the password does not decrypt a key.
        KeyPasswordError: the password file is unusable.
        KeyFileError: a key file is missing, unreadable or not an Ed25519 private key.
    """
    given = _given_password(password_file)
    keys = []
    for path in paths:
        try:
            keys.append(load_signing_key(path, given))
        except KeyPasswordRequiredError:
            if not _stdin_is_terminal():
                logger.warning("cannot load encrypted key %s: no password and no terminal", path)
                raise KeyPasswordRequiredError(
                    f"{path} is encrypted: give its password with --key-password-file FILE "
                    f"or the {KEY_UNLOCK_ENV} environment variable (no terminal to ask on)"
                ) from None
            keys.append(load_signing_key(path, _prompt(f"Password for {path}")))
    return keys


def new_key_password(password_file: Path | None) -> bytes:
    """The password to encrypt a new key with: file, environment, or asked twice.

    Raises:
        KeyPasswordRequiredError: no password given and no terminal to ask on.
        KeyPasswordError: the password file is unusable.
    """
    given = _given_password(password_file)
    if given is not None:
        return given
    if not _stdin_is_terminal():
        logger.warning("no password to encrypt the new key with and no terminal")
        raise KeyPasswordRequiredError(
            "--encrypt needs a password: give --key-password-file FILE or the "
            f"{KEY_UNLOCK_ENV} environment variable (no terminal to ask on)"
        )
    return _prompt("Password for the new key", confirm=True)
