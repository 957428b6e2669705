"""The pure trust core: may this device install this model?

Modelled on python-tuf's ``TrustedMetadataSet``: functions here take bytes, stored
state and the current time as arguments and return values or typed errors; they do no
I/O, read no clock and keep no global state, so every rule is unit-testable and the
agent, the coordinator and the CLI apply exactly the same rules.

:func:`verify_manifest` applies the DESIGN.md trust model in order:

1. signatures: at least *threshold* distinct trusted Ed25519 keys
   (:func:`compress.signing.verify_signatures`);
2. expiry: ``expires`` is after ``now``;
3. rollback: ``version`` is strictly above the highest version ever installed for the
   model name (the caller persists that counter; it survives reinstalls and reboots);
4. device fit: the format's runtime is available and the device has every hardware tag.

Only then does anything download the payload; :class:`PayloadVerifier` checks it as it
streams in (rule 5: length and sha256), refusing to accept a single byte past the
declared length, so nothing larger than the manifest says is ever buffered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from compress.errors import (
    ExpiredError,
    IncompatibleDeviceError,
    PayloadHashError,
    PayloadLengthError,
    RollbackError,
)
from compress.manifest import Manifest, format_time
from compress.signing import SignedManifest, TrustedKeys, verify_signatures

#: Which inference runtime each model format needs on the device.
RUNTIME_FOR_FORMAT = {"onnx": "onnxruntime", "tflite": "tflite"}


@dataclass(frozen=True)
class DeviceProfile:
    """What a device offers: its inference runtimes and its hardware tags."""

    runtimes: frozenset[str] = field(default_factory=lambda: frozenset({"onnxruntime"}))
    hardware_tags: frozenset[str] = frozenset()


def check_device_fit(manifest: Manifest, device: DeviceProfile) -> None:
    """Raise unless ``device`` can run ``manifest``'s model.

    Raises:
        IncompatibleDeviceError: the runtime is missing or hardware tags are missing.
    """
    runtime = RUNTIME_FOR_FORMAT[manifest.format]
    if runtime not in device.runtimes:
        have = ", ".join(sorted(device.runtimes)) or "none"
        raise IncompatibleDeviceError(
            f"{manifest.format} models need the {runtime} runtime; this device has {have}"
        )
    missing = set(manifest.hardware_tags) - device.hardware_tags
    if missing:
        raise IncompatibleDeviceError(f"device lacks hardware tags: {', '.join(sorted(missing))}")


def verify_manifest(
    signed: SignedManifest,
    trusted: TrustedKeys,
    *,
    now: datetime,
    installed_version: int | None = None,
    device: DeviceProfile | None = None,
) -> Manifest:
    """Decide whether a signed manifest may be installed, before any payload moves.

    Args:
        signed: the manifest bytes and signatures as received.
        trusted: the trusted keys and threshold.
        now: the current time (timezone-aware).
        installed_version: the highest version ever installed for this model name, or
            None when this device never installed it (and for checks that are not
            about installing, like ``fedge model inspect``).
        device: the device to check fit against, or None to skip that rule.

    Returns:
        The verified manifest.

    Raises:
        SignatureError: (a subclass) signatures do not establish trust.
        ManifestError: trusted bytes that are not a valid manifest.
        ExpiredError: the manifest has expired.
        RollbackError: the version is not above ``installed_version``.
        IncompatibleDeviceError: the device cannot run the model.
        ValueError: ``now`` is naive (a caller's bug, not an artifact's).
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    manifest = verify_signatures(signed, trusted)
    check_manifest(manifest, now=now, installed_version=installed_version, device=device)
    return manifest


def check_manifest(
    manifest: Manifest,
    *,
    now: datetime,
    installed_version: int | None = None,
    device: DeviceProfile | None = None,
) -> None:
    """Rules 2 to 4 of :func:`verify_manifest` (expiry, rollback, device fit), in order.

    For a manifest whose signatures were already verified
    (:func:`compress.signing.verify_signatures`).

    Raises:
        ExpiredError: the manifest has expired.
        RollbackError: the version is not above ``installed_version``.
        IncompatibleDeviceError: the device cannot run the model.
        ValueError: ``now`` is naive.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    if manifest.expires <= now:
        raise ExpiredError(f"manifest expired at {format_time(manifest.expires)}")
    if installed_version is not None and manifest.version <= installed_version:
        raise RollbackError(
            f"{manifest.name} v{manifest.version} is not newer than v{installed_version}, "
            "the highest version installed before"
        )
    if device is not None:
        check_device_fit(manifest, device)


class PayloadVerifier:
    """Incrementally checks a payload against its manifest's length and sha256.

    Feed bytes with :meth:`update` as they arrive (from a file or from chunks); call
    :meth:`finish` at the end. ``update`` refuses data beyond the declared length
    before hashing or storing it.
    """

    def __init__(self, manifest: Manifest) -> None:
        self._expected_length = manifest.length
        self._expected_sha256 = manifest.sha256
        self._hash = hashlib.sha256()
        self._received = 0

    @property
    def received(self) -> int:
        """Bytes accepted so far."""
        return self._received

    @property
    def remaining(self) -> int:
        """Bytes still expected."""
        return self._expected_length - self._received

    def update(self, data: bytes) -> None:
        """Accept the next bytes of the payload.

        Raises:
            PayloadLengthError: the data would go past the declared length.
        """
        if len(data) > self.remaining:
            raise PayloadLengthError(
                f"payload is longer than the {self._expected_length} bytes the manifest declares"
            )
        self._hash.update(data)
        self._received += len(data)

    def finish(self) -> None:
        """Check that the whole payload arrived and hashes as declared.

        Raises:
            PayloadLengthError: fewer bytes than declared.
            PayloadHashError: the sha256 differs.
        """
        if self._received != self._expected_length:
            raise PayloadLengthError(
                f"payload is {self._received} bytes, the manifest declares {self._expected_length}"
            )
        digest = self._hash.hexdigest()
        if digest != self._expected_sha256:
            raise PayloadHashError(
                f"payload sha256 {digest[:16]}... does not match the manifest's "
                f"{self._expected_sha256[:16]}..."
            )
