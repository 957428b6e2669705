"""The record of what a fedge CA issued and revoked (``<ca dir>/index.json``).

:mod:`coordinator.link.ca` signs certificates; this module remembers them, so that
``fedge ca revoke DIR DEVICE`` can find every certificate of a device by its id, the
CRL can list every revoked serial, and a revoked device id is not silently given a
new certificate. The file is small JSON, rewritten atomically after every change,
and read and written only under :func:`locked` (an exclusive ``flock`` on
``<ca dir>/.lock``), so the service's enrollment route and an operator's
``fedge ca`` command can issue or revoke at the same time without losing a record.

Workflow::

    with locked(ca_dir):
        index = CaIndex.load(ca_dir / "index.json")
        index.add(IssuedCertificate(serial=..., kind="device", name="cam-1", ...))
        index.save()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from compress.fileio import atomic_write, read_bounded
from coordinator.errors import CertificateAuthorityError

__all__ = ["INDEX_FILE", "CaIndex", "CertificateKind", "IssuedCertificate", "locked"]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
INDEX_VERSION = 1
MAX_INDEX_BYTES = 64 * 1024 * 1024
"""A sanity bound on the index file (about 200 000 certificates)."""

CertificateKind = Literal["device", "coordinator", "server"]
KINDS: tuple[CertificateKind, ...] = ("device", "coordinator", "server")


def _fail(message: str) -> CertificateAuthorityError:
    logger.error("CA index: %s", message)
    return CertificateAuthorityError(message)


@contextlib.contextmanager
def locked(ca_dir: Path) -> Iterator[None]:
    """Hold the CA directory's exclusive lock (blocking) for the ``with`` body."""
    try:
        fd = os.open(ca_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _fail(f"cannot open the lock file in {ca_dir}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


@dataclass(frozen=True)
class IssuedCertificate:
    """One certificate the CA signed.

    Attributes:
        serial: The certificate's serial number (random, 159 bits).
        kind: ``device`` (CN = device id), ``coordinator`` (a coordinator account)
            or ``server`` (the broker's certificate, CN = host).
        name: The certificate's CN.
        not_before: Start of validity (ISO 8601, UTC).
        not_after: End of validity (ISO 8601, UTC).
        revoked_at: When it was revoked; None while it is valid.
    """

    serial: int
    kind: CertificateKind
    name: str
    not_before: str
    not_after: str
    revoked_at: str | None = None

    @property
    def revoked(self) -> bool:
        """Whether the certificate is on the CRL."""
        return self.revoked_at is not None

    @classmethod
    def from_json(cls, data: Any) -> IssuedCertificate:
        """Read one record; raises :class:`CertificateAuthorityError` on a bad one."""
        try:
            record = cls(
                serial=int(data["serial"], 16),
                kind=data["kind"],
                name=str(data["name"]),
                not_before=str(data["not_before"]),
                not_after=str(data["not_after"]),
                revoked_at=None if data.get("revoked_at") is None else str(data["revoked_at"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _fail(f"a malformed certificate record ({exc!r})") from None
        if record.kind not in KINDS:
            raise _fail(f"unknown certificate kind {record.kind!r}")
        return record

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data (the serial in hex)."""
        return {**asdict(self), "serial": f"{self.serial:x}"}


@dataclass
class CaIndex:
    """Every certificate the CA issued, and the number of the last CRL.

    Attributes:
        path: The index file.
        certificates: In the order they were issued.
        crl_number: The CRL number of the last CRL written (0: none yet).
    """

    path: Path
    certificates: list[IssuedCertificate] = field(default_factory=list)
    crl_number: int = 0

    @classmethod
    def load(cls, path: Path) -> CaIndex:
        """Read the index; a missing file is an error (the CA was not initialised)."""
        if not path.exists():
            raise _fail(f"{path} is missing: not a CA directory (run fedge ca init)")
        raw = read_bounded(path, max_bytes=MAX_INDEX_BYTES, error=CertificateAuthorityError,
                           what="CA index")  # fmt: skip
        try:
            data = json.loads(raw)
            if data["version"] != INDEX_VERSION:
                raise _fail(f"{path}: index version {data['version']!r} is not {INDEX_VERSION}")
            records = [IssuedCertificate.from_json(item) for item in data["certificates"]]
            crl_number = int(data["crl_number"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _fail(f"{path} is not a CA index ({exc!r})") from None
        return cls(path, records, crl_number)

    def save(self) -> None:
        """Write the index atomically."""
        data = {
            "version": INDEX_VERSION,
            "crl_number": self.crl_number,
            "certificates": [record.to_json() for record in self.certificates],
        }
        try:
            atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode(), mode=0o600)
        except OSError as exc:
            raise _fail(f"cannot write {self.path}: {exc}") from None

    def add(self, record: IssuedCertificate) -> None:
        """Record a newly issued certificate."""
        self.certificates.append(record)

    def of(self, kind: CertificateKind, name: str) -> list[IssuedCertificate]:
        """Every certificate of that kind and CN, revoked ones included."""
        return [r for r in self.certificates if r.kind == kind and r.name == name]

    def revoke(self, kind: CertificateKind, name: str, when: datetime) -> int:
        """Mark every valid certificate of that kind and CN revoked; how many were."""
        count = 0
        for position, record in enumerate(self.certificates):
            if record.kind == kind and record.name == name and not record.revoked:
                self.certificates[position] = replace(record, revoked_at=when.isoformat())
                count += 1
        return count

    def revoked(self) -> list[IssuedCertificate]:
        """Every revoked certificate (what the CRL lists)."""
        return [r for r in self.certificates if r.revoked]
