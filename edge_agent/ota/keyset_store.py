"""The device's trusted key set: provisioned once, rotated over MQTT, stored atomically.

A device provisioned with ``trust.keyset`` (a :class:`compress.keyset.SignedKeySet`
file, from ``fedge keys keyset-init`` or enrollment) trusts the keys of a *key set*
instead of fixed ``.pub`` files, and that trust can rotate without touching the
device (issue 17). :func:`load_trust` is what the agent calls: fixed keys without a
key set, else a :class:`KeySetStore`, whose :meth:`KeySetStore.current` the
:class:`~edge_agent.ota.updates.Updater` asks afresh for each decision (deploys,
resumed transfers, start-up re-verification).

Workflow:

1. First start (:meth:`KeySetStore.open`): the provisioned file is verified (a
   version 1 with :func:`compress.keyset.verify_initial_keyset`; a later version,
   as enrollment hands out after rotations, must be signed by a threshold of its
   own keys and unexpired: like version 1 it is trusted because of the path it
   came by) and written to ``data_dir/trust/keyset.json``.
2. Later starts: the stored key set wins when its version is at least the
   provisioned file's, so a stale provisioning file never rolls trust back; a
   provisioned file with a *higher* version is a re-provisioning and replaces it.
3. Rotation (:meth:`KeySetStore.receive`, from the retained
   :class:`~edge_agent.protocol.messages_keys.KeySetChain`): the chain's versions
   above the trusted one are applied in order with
   :func:`compress.keyset.verify_rotation_chain` (threshold of the old keys and of
   the new ones, exactly one version up each step, the result unexpired), so a
   device that missed several rotations catches up in one step. A chain that ends
   at the trusted version is the normal retained re-delivery and changes nothing;
   one that ends below it (a replayed, older key set) or that does not verify is
   refused with a typed :mod:`compress` error and a log line, and the device keeps
   trusting what it trusted.

Storage: the file holds the signed bytes of the newest trusted key set only and is
replaced with :func:`compress.fileio.atomic_write` (temporary file, fsync, rename,
directory fsync), so after a crash it holds either the old key set or the new one,
never half a rotation. It sits beside the model store's ``state.json`` rather than
inside it: a rotation changes no rollback counter and an install changes no key, so
no write ever has to change both, and two independently atomic files give the same
guarantee as one. The stored key set is checked against its own signatures when it
is read back (a damaged file stops the agent with a :class:`StateError`).

Models signed only by a retired key: the keys are asked afresh at every decision,
so after a rotation a deploy signed by a retired key is refused at once, and an
installed model whose manifest no longer meets the new threshold is refused at the
next start-up re-verification (:mod:`edge_agent.ota.reverify`; it is not served,
and the agent reports it). Until that restart the model already loaded keeps
serving. The operator re-signs such models with current keys and redeploys them
(a new version) before or right after rotating a key out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from compress.errors import CompressError, RollbackError
from compress.fileio import atomic_write, read_bounded
from compress.keyset import (
    MAX_SIGNED_KEYSET_BYTES,
    KeySet,
    SignedKeySet,
    check_not_expired,
    verify_initial_keyset,
    verify_rotation_chain,
    verify_self_signed,
)
from compress.manifest import format_time
from compress.signing import TrustedKeys
from edge_agent.config.sections import TrustConfig
from edge_agent.errors import ConfigError, StateError

__all__ = ["KEYSET_PATH", "KeySetStore", "load_trust"]

logger = logging.getLogger(__name__)

KEYSET_PATH = Path("trust") / "keyset.json"
"""Where the trusted key set is stored, relative to the data directory."""


def load_trust(trust: TrustConfig, data_dir: Path, *, now: datetime) -> TrustedKeys | KeySetStore:
    """The device's trust: fixed keys (``trust.keys``) or its key-set store.

    Args:
        trust: The ``[trust]`` settings; ``trust.keyset`` replaces keys and threshold.
        data_dir: The agent's data directory (it must exist).
        now: The current time (timezone-aware).

    Raises:
        ConfigError: a key or key-set file is unusable, or the provisioned key set
            does not verify (and no newer one is stored).
        StateError: the stored key set cannot be read, written or verified.
    """
    if trust.keyset is None:
        return trust.load()
    return KeySetStore.open(data_dir, trust.read_keyset(), now=now)


def _verify_provisioned(signed: SignedKeySet, *, now: datetime) -> KeySet:
    """Accept the provisioned key set (trusted by its path; see the module docstring)."""
    try:
        if signed.keyset.version == 1:
            return verify_initial_keyset(signed, now=now)
        keyset = verify_self_signed(signed)
        check_not_expired(keyset, now=now)
        return keyset
    except CompressError as exc:
        logger.error("refused the provisioned key set: %s: %s", exc.code, exc)
        raise ConfigError(f"trust.keyset: {exc}") from exc


def _check_stored(path: Path, signed: SignedKeySet) -> KeySet:
    try:
        return verify_self_signed(signed)
    except CompressError as exc:
        logger.error("the stored key set %s does not verify: %s", path, exc)
        raise StateError(f"{path}: the stored key set does not verify: {exc}") from exc


class KeySetStore:
    """The key set a device trusts now, and its rotations (see the module docstring).

    Used from the agent's worker thread; :meth:`current` may be called from any thread.
    """

    def __init__(self, path: Path, signed: SignedKeySet, keyset: KeySet) -> None:
        """Use :meth:`open`; this takes a key set that is already verified."""
        self._path = path
        self._trusted = (signed, keyset)  # replaced as one value: readers see a pair

    @classmethod
    def open(cls, data_dir: Path, provisioned: SignedKeySet, *, now: datetime) -> KeySetStore:
        """The stored key set, or the provisioned one if it is newer (or none is stored).

        Raises:
            ConfigError: the provisioned key set is needed and does not verify.
            StateError: the stored key set cannot be read or verified, or the accepted
                one cannot be written.
        """
        path = data_dir / KEYSET_PATH
        stored = cls._read(path)
        offered = provisioned.keyset
        if stored is not None and stored.keyset.version >= offered.version:
            keyset = _check_stored(path, stored)
            if keyset.version > offered.version:
                logger.info(
                    "trusting the stored key set v%d (trust.keyset is the older v%d)",
                    keyset.version, offered.version,
                )  # fmt: skip
            elif stored.document != provisioned.document:
                logger.warning(
                    "trust.keyset differs from the stored key set of the same version v%d; "
                    "keeping the stored one",
                    keyset.version,
                )
            store = cls(path, stored, keyset)
        else:
            keyset = _verify_provisioned(provisioned, now=now)
            store = cls(path, provisioned, keyset)
            store._save(provisioned)
            logger.info(
                "trusting key set v%d from trust.keyset: %d of %d keys",
                keyset.version, keyset.threshold, len(keyset.keys),
            )  # fmt: skip
        if store.keyset.expires <= now:
            logger.warning(
                "the trusted key set v%d expired at %s: publish a rotation (fedge keys rotate, "
                "fedge keys publish)",
                store.version, format_time(store.keyset.expires),
            )  # fmt: skip
        return store

    @staticmethod
    def _read(path: Path) -> SignedKeySet | None:
        if not path.exists():
            return None
        try:
            data = read_bounded(
                path, max_bytes=MAX_SIGNED_KEYSET_BYTES, error=StateError, what="stored key set"
            )
            signed = SignedKeySet.from_bytes(data)
            _ = signed.keyset
        except CompressError as exc:
            logger.error("the stored key set %s is unreadable: %s", path, exc)
            raise StateError(f"{path}: not a signed key set: {exc}") from exc
        return signed

    def _save(self, signed: SignedKeySet) -> None:
        try:
            self._path.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write(self._path, signed.to_bytes(), mode=0o600)
        except OSError as exc:
            logger.error("cannot store the key set in %s: %s", self._path, exc)
            raise StateError(f"cannot store the key set in {self._path}: {exc}") from exc

    @property
    def keyset(self) -> KeySet:
        """The trusted key set."""
        return self._trusted[1]

    @property
    def version(self) -> int:
        """The trusted key set's version (reported in the agent's status)."""
        return self._trusted[1].version

    def current(self) -> TrustedKeys:
        """The keys and threshold manifests must meet now."""
        return self._trusted[1].trusted()

    def apply(self, chain: Sequence[bytes], *, now: datetime) -> KeySet | None:
        """Apply the versions of ``chain`` above the trusted one, in order.

        Args:
            chain: Consecutive signed key sets, oldest first (a
                :class:`~edge_agent.protocol.messages_keys.KeySetChain`'s).
            now: The current time (timezone-aware).

        Returns:
            The new key set (stored), or None when the chain ends at the trusted
            version (nothing to do).

        Raises:
            KeySetError: an entry is not a signed key set.
            RollbackError: the chain ends below the trusted version (a replayed
                key set), or its versions do not continue the trusted one (also when
                the device is further behind than the chain reaches).
            SignatureError: (a subclass) a step is not signed by a threshold of the
                old keys or of the new ones.
            ExpiredError: the resulting key set has expired.
            StateError: the new key set cannot be stored (trust is unchanged).
        """
        # Versions are read from bytes not yet verified (strictly parsed, each at most
        # MAX_KEYSET_BYTES) only to pick the steps; verify_rotation_chain decides trust.
        signed = [SignedKeySet.from_bytes(blob) for blob in chain]
        current = self.keyset
        newer = [s for s in signed if s.keyset.version > current.version]
        if not newer:
            top = max((s.keyset.version for s in signed), default=0)
            if top == current.version:
                return None
            raise RollbackError(
                f"the key-set chain ends at v{top}, older than the trusted "
                f"v{current.version} (a replayed key set)"
            )
        if newer[0].keyset.version != current.version + 1:  # unverified, for the message only
            raise RollbackError(
                f"the key-set chain skips versions: it goes on from v{newer[0].keyset.version - 1}"
                f", this device trusts v{current.version}; if the chain was cut (it holds the "
                "newest key sets only), re-provision the device with a current key-set file"
            )
        keyset = verify_rotation_chain(current, newer, now=now)
        self._save(newer[-1])
        self._trusted = (newer[-1], keyset)
        return keyset

    def receive(self, chain: Sequence[bytes], *, now: datetime) -> bool:
        """:meth:`apply` a received chain, logging the rotation or the refusal.

        Returns:
            True when the trusted key set changed.
        """
        before = self.version
        try:
            keyset = self.apply(chain, now=now)
        except (CompressError, StateError) as exc:
            logger.warning(
                "refused the key-set chain: %s: %s (still trusting key set v%d)",
                exc.code, exc, before,
            )  # fmt: skip
            return False
        if keyset is None:
            logger.debug("key set v%d is current", before)
            return False
        logger.warning(
            "rotated the trusted key set from v%d to v%d: %d of %d keys must sign (%s)",
            before, keyset.version, keyset.threshold, len(keyset.keys),
            ", ".join(k[:16] for k in keyset.key_ids),
        )  # fmt: skip
        return True
