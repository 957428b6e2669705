"""Ed25519 signing keys: generate, save, load, and name them by key id.

Workflow: an operator runs ``fedge keys generate --out keys/``, which calls
:func:`generate_signing_key` and :func:`save_keypair`: ``keys/signing.key`` (PKCS#8 PEM,
mode 0600, never overwritten unless asked) and ``keys/signing.pub`` (SubjectPublicKeyInfo
PEM). The public key is copied to devices; the coordinator signs manifests with the
private key (:mod:`compress.signing`).

A key id is the lowercase hex sha256 of the raw 32-byte public key: stable, short to
compare, and independent of the PEM wrapping. Manifest signatures name their key by it.

Encrypted keys: ``fedge keys generate --encrypt`` passes a password to
:func:`save_keypair`, which writes the private key as encrypted PKCS#8
(``-----BEGIN ENCRYPTED PRIVATE KEY-----``, the best encryption ``cryptography``
offers). :func:`load_signing_key` takes the password; an encrypted key without one
raises :class:`~compress.errors.KeyPasswordRequiredError` (its message says how to give
one), a wrong one :class:`~compress.errors.WrongKeyPasswordError` (no text from
``cryptography``). A password given for an unencrypted key is ignored, so one password
can be tried on every key of a command. Where the password comes from (a file, the
environment, a prompt) is the CLI's business: :mod:`coordinator.cli.key_loading`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compress.errors import (
    KeyFileError,
    KeyPasswordError,
    KeyPasswordRequiredError,
    WrongKeyPasswordError,
)
from compress.fileio import atomic_write, read_bounded

logger = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"
MAX_KEY_FILE_BYTES = 16 * 1024
ENCRYPTED_PEM_MARKER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
MIN_NEW_PASSWORD_BYTES = 8
"""Shortest password :meth:`SigningKey.to_pem` encrypts a key with."""
UNLOCK_HINT = (
    "give its password: --key-password-file FILE or the FEDGE_KEY_PASSWORD environment "
    "variable, or run the command in a terminal to be asked for it"
)
"""How an operator gives a key's password to fedge commands (in the error messages)."""


def key_id_of(raw_public_key: bytes) -> str:
    """The key id of a raw 32-byte Ed25519 public key: its sha256, lowercase hex."""
    return hashlib.sha256(raw_public_key).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key that verifies manifest signatures."""

    raw: bytes
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise KeyFileError(f"an Ed25519 public key is 32 bytes, got {len(self.raw)}")
        object.__setattr__(self, "_key", Ed25519PublicKey.from_public_bytes(self.raw))

    @property
    def key_id(self) -> str:
        """Lowercase hex sha256 of the raw key."""
        return key_id_of(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this key's valid signature over ``data``."""
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM encoding."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """Parse a SubjectPublicKeyInfo PEM Ed25519 public key.

        Raises:
            KeyFileError: not a PEM public key, or not Ed25519.
        """
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"not a PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"expected an Ed25519 public key, got {type(key).__name__}")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(raw)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key that signs manifests."""

    private: Ed25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> PublicKey:
        """The matching public key."""
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    @property
    def key_id(self) -> str:
        """The key id of the matching public key."""
        return self.public_key.key_id

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature over ``data``."""
        return self.private.sign(data)

    def to_pem(self, password: bytes | None = None) -> bytes:
        """PKCS#8 PEM encoding: unencrypted, or encrypted with ``password``.

        Raises:
            KeyPasswordError: ``password`` is shorter than :data:`MIN_NEW_PASSWORD_BYTES`.
        """
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
        if password is not None:
            if len(password) < MIN_NEW_PASSWORD_BYTES:
                logger.warning("refused a key password of %d bytes", len(password))
                raise KeyPasswordError(
                    f"a key password must be at least {MIN_NEW_PASSWORD_BYTES} bytes long"
                )
            encryption = serialization.BestAvailableEncryption(password)
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    @classmethod
    def from_pem(cls, data: bytes, password: bytes | None = None) -> SigningKey:
        """Parse a PKCS#8 PEM Ed25519 private key, decrypting it with ``password``.

        ``password`` is ignored for an unencrypted key.

        Raises:
            KeyPasswordRequiredError: the key is encrypted and ``password`` is None or empty.
            WrongKeyPasswordError: ``password`` does not decrypt the key.
            KeyFileError: not a PEM private key, or not Ed25519.
        """
        encrypted = is_encrypted_pem(data)
        if encrypted and not password:
            raise KeyPasswordRequiredError(f"the key is encrypted; {UNLOCK_HINT}")
        try:
            key = serialization.load_pem_private_key(data, password=password if encrypted else None)
        except ValueError as exc:
            if encrypted:  # cryptography's text would only repeat this, or leak internals
                raise WrongKeyPasswordError(
                    "the password does not decrypt the key (or the key file is damaged)"
                ) from None
            raise KeyFileError(f"not a PEM private key: {exc}") from exc
        except (TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)


def is_encrypted_pem(data: bytes) -> bool:
    """True if ``data`` holds an encrypted PKCS#8 PEM private key."""
    return ENCRYPTED_PEM_MARKER in data


def generate_signing_key() -> SigningKey:
    """A fresh Ed25519 signing key from the operating system's randomness."""
    return SigningKey(Ed25519PrivateKey.generate())


def save_keypair(
    key: SigningKey, directory: Path, *, overwrite: bool = False, password: bytes | None = None
) -> tuple[Path, Path]:
    """Write ``signing.key`` (mode 0600) and ``signing.pub`` into ``directory``.

    The directory is created (mode 0700) if missing. Both files are written atomically.
    With ``password`` the private key is encrypted with it (see :meth:`SigningKey.to_pem`).

    Returns:
        The private and public key paths.

    Raises:
        KeyPasswordError: ``password`` is too short.
        KeyFileError: a key file exists and ``overwrite`` is false, or the directory
            cannot be written.
    """
    private_pem = key.to_pem(password)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise KeyFileError(f"{directory} exists and is not a directory")
    private_path = directory / PRIVATE_KEY_NAME
    public_path = directory / PUBLIC_KEY_NAME
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(private_path, private_pem, mode=0o600, overwrite=overwrite)
        atomic_write(public_path, key.public_key.to_pem(), mode=0o644, overwrite=overwrite)
    except FileExistsError as exc:
        raise KeyFileError(f"{exc}; refusing to overwrite a key") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write keys to {directory}: {exc.strerror or exc}") from exc
    logger.info(
        "wrote %s signing key %s to %s",
        "an encrypted" if password is not None else "an unencrypted",
        key.key_id,
        directory,
    )
    return private_path, public_path


def _read_key_file(path: Path) -> bytes:
    return read_bounded(path, max_bytes=MAX_KEY_FILE_BYTES, error=KeyFileError, what="key file")


def warn_if_readable_by_others(path: Path, what: str) -> None:
    """Log a warning if group or others may access the secret file ``path``."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        logger.warning("%s %s is readable by others (mode %o); chmod 600 it", what, path, mode)


def _signing_key_from(path: Path, data: bytes, password: bytes | None = None) -> SigningKey:
    try:
        key = SigningKey.from_pem(data, password)
    except KeyPasswordRequiredError as exc:
        logger.info("private key %s is encrypted and no password was given", path)
        raise KeyPasswordRequiredError(f"{path}: {exc}") from None
    except WrongKeyPasswordError as exc:
        logger.warning("cannot decrypt private key %s: wrong password", path)
        raise WrongKeyPasswordError(f"{path}: {exc}") from None
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
    warn_if_readable_by_others(path, "private key")
    return key


def _public_key_from(path: Path, data: bytes) -> PublicKey:
    try:
        return PublicKey.from_pem(data)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc


def load_signing_key(path: Path, password: bytes | None = None) -> SigningKey:
    """Load a private signing key; warns in the log if others can read the file.

    ``password`` decrypts an encrypted key; it is ignored for an unencrypted one.

    Raises:
        KeyPasswordRequiredError: the key is encrypted and no password was given.
        WrongKeyPasswordError: ``password`` does not decrypt the key.
        KeyFileError: missing, unreadable, or not an Ed25519 private key.
    """
    path = Path(path)
    return _signing_key_from(path, _read_key_file(path), password)


def load_public_key(path: Path) -> PublicKey:
    """Load a public key from a PEM file.

    Raises:
        KeyFileError: missing, unreadable, or not an Ed25519 public key.
    """
    path = Path(path)
    return _public_key_from(path, _read_key_file(path))


def load_any_key(path: Path) -> PublicKey:
    """The public key of a key file that holds either a public or a private key.

    Raises:
        KeyFileError: missing or unreadable, or neither kind of Ed25519 key.
    """
    path = Path(path)
    data = _read_key_file(path)
    if b"PRIVATE KEY-----" in data:
        return _signing_key_from(path, data).public_key
    return _public_key_from(path, data)


MAX_KEY_PASSWORD_FILE_BYTES = 4096
"""Largest key-password file read (``--key-password-file``, the service's
``[fleet] key_password_file``)."""


def read_key_password_file(path: Path) -> bytes:
    """The first line of a key-password file, without its line ending.

    Raises:
        KeyPasswordError: the file is missing, unreadable, too large, or its first line
            is empty.
    """
    raw = read_bounded(
        path, max_bytes=MAX_KEY_PASSWORD_FILE_BYTES, error=KeyPasswordError, what="password file"
    )
    warn_if_readable_by_others(path, "key password file")
    password = raw.split(b"\n", 1)[0].rstrip(b"\r")
    if not password:
        logger.warning("key password file %s has an empty first line", path)
        raise KeyPasswordError(f"{path}: the first line (the key password) is empty")
    return password
