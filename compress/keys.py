"""Ed25519 signing keys: generate, save, load, and name them by key id.

Workflow: an operator runs ``fedge keys generate --out keys/``, which calls
:func:`generate_signing_key` and :func:`save_keypair`: ``keys/signing.key`` (PKCS#8 PEM,
mode 0600, never overwritten unless asked) and ``keys/signing.pub`` (SubjectPublicKeyInfo
PEM). The public key is copied to devices; the coordinator signs manifests with the
private key (:mod:`compress.signing`).

A key id is the lowercase hex sha256 of the raw 32-byte public key: stable, short to
compare, and independent of the PEM wrapping. Manifest signatures name their key by it.
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

from compress.errors import KeyFileError
from compress.fileio import atomic_write, read_bounded

logger = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"
MAX_KEY_FILE_BYTES = 16 * 1024


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

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM encoding (protect it with file permissions)."""
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Parse an unencrypted PKCS#8 PEM Ed25519 private key.

        Raises:
            KeyFileError: not a PEM private key, encrypted, or not Ed25519.
        """
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)


def generate_signing_key() -> SigningKey:
    """A fresh Ed25519 signing key from the operating system's randomness."""
    return SigningKey(Ed25519PrivateKey.generate())


def save_keypair(key: SigningKey, directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``signing.key`` (mode 0600) and ``signing.pub`` into ``directory``.

    The directory is created (mode 0700) if missing. Both files are written atomically.

    Returns:
        The private and public key paths.

    Raises:
        KeyFileError: a key file exists and ``overwrite`` is false, or the directory
            cannot be written.
    """
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
        atomic_write(private_path, key.to_pem(), mode=0o600, overwrite=overwrite)
        atomic_write(public_path, key.public_key.to_pem(), mode=0o644, overwrite=overwrite)
    except FileExistsError as exc:
        raise KeyFileError(f"{exc}; refusing to overwrite a key") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write keys to {directory}: {exc.strerror or exc}") from exc
    logger.info("wrote signing key %s to %s", key.key_id, directory)
    return private_path, public_path


def _read_key_file(path: Path) -> bytes:
    return read_bounded(path, max_bytes=MAX_KEY_FILE_BYTES, error=KeyFileError, what="key file")


def _signing_key_from(path: Path, data: bytes) -> SigningKey:
    try:
        key = SigningKey.from_pem(data)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        logger.warning("private key %s is readable by others (mode %o); chmod 600 it", path, mode)
    return key


def _public_key_from(path: Path, data: bytes) -> PublicKey:
    try:
        return PublicKey.from_pem(data)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc


def load_signing_key(path: Path) -> SigningKey:
    """Load a private signing key; warns in the log if others can read the file.

    Raises:
        KeyFileError: missing, unreadable, or not an Ed25519 private key.
    """
    path = Path(path)
    return _signing_key_from(path, _read_key_file(path))


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
