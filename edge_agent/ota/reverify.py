"""Re-verifying an installed model against its signed manifest before serving it.

``state.json`` is not signed: whoever can write the agent's data directory can
point it at any file. So before the agent serves a model from a slot (at start-up,
for the current model and for the rollback candidate, and before a rollback), the
slot is checked again with the device's trusted keys and threshold, exactly as the
updater checks a deploy:

1. the signed manifest kept with the slot (``slots/<x>/manifest.fsm``, written at
   install) must carry at least *threshold* valid signatures of trusted keys
   (:func:`compress.signing.verify_signatures`);
2. it must name the model ``state.json`` records (name, version, sha256, format);
3. the payload bytes on disk must have the manifest's length and sha256
   (:class:`compress.trust.PayloadVerifier`); these very bytes are the ones loaded,
   so nothing can change between the check and the load.

A failure of any of these is an :class:`~edge_agent.errors.UntrustedModelError`
(its ``cause_code`` says which rule): the model is not served.

Expiry (:func:`compress.trust.check_manifest`) is checked too, but an expired
installed model is still served: its signatures and hash prove where it came from
and that it is intact, and a device cut off from its coordinator should not stop
answering because time passed. The result says ``expired``; the agent logs a
warning and reports it (an ``install_status`` event and ``/v1/health``), so the
operator sees a device held on an expired model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from compress.errors import CompressError, ExpiredError
from compress.manifest import Manifest
from compress.signing import SignedManifest, TrustedKeys, verify_signatures
from compress.trust import PayloadVerifier, check_manifest
from edge_agent.errors import StateError, UntrustedModelError
from edge_agent.ota.model_store import InstalledModel, ModelStore

__all__ = ["ModelProblem", "VerifiedModel", "verify_installed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VerifiedModel:
    """An installed model that passed re-verification.

    Attributes:
        model: The ``state.json`` record (equal to the manifest's fields).
        manifest: The verified manifest.
        payload: The verified payload bytes, to load.
        expired: Whether the manifest has expired (the model is still served).
    """

    model: InstalledModel
    manifest: Manifest
    payload: bytes
    expired: bool


@dataclass(frozen=True, slots=True)
class ModelProblem:
    """What the start-up check found wrong with an installed model.

    Attributes:
        slot: The slot.
        name: Model name (as ``state.json`` records it).
        version: Model version (as ``state.json`` records it).
        code: ``untrusted_model`` (not served), ``expired`` (served) or another
            error's code (not served).
        reason: The message.
        served: Whether the model is served anyway.
    """

    slot: str
    name: str
    version: int
    code: str
    reason: str
    served: bool

    @classmethod
    def of(cls, model: InstalledModel, code: str, reason: str, *, served: bool) -> ModelProblem:
        """The problem ``code`` (``reason``) of an installed model."""
        return cls(model.slot, model.name, model.version, code, reason, served)

    def to_json(self) -> dict[str, Any]:
        """JSON form (for ``/v1/health``)."""
        return {
            "slot": self.slot,
            "name": self.name,
            "version": self.version,
            "code": self.code,
            "reason": self.reason,
            "served": self.served,
        }


def verify_installed(
    store: ModelStore, model: InstalledModel, *, trusted: TrustedKeys, now: datetime
) -> VerifiedModel:
    """Check an installed model against the signed manifest kept with it.

    Raises:
        UntrustedModelError: the manifest is missing, unreadable, not trusted or
            names another model, or the payload's length or sha256 differs.
        ValueError: ``now`` is naive (a caller's bug).
    """
    try:
        signed = SignedManifest.from_bytes(store.read_manifest_blob(model.slot))
        manifest = verify_signatures(signed, trusted)
        _check_record(model, manifest)
        payload = store.read_slot_payload(model.slot)
        verifier = PayloadVerifier(manifest)
        verifier.update(payload)
        verifier.finish()
    except (CompressError, StateError) as exc:
        raise UntrustedModelError(
            f"refusing to serve {model.name} v{model.version} from slot {model.slot}: "
            f"{exc} ({exc.code})",
            cause_code=exc.code,
        ) from exc
    try:
        check_manifest(manifest, now=now)
    except ExpiredError as exc:
        logger.warning(
            "%s v%d in slot %s: %s (served anyway, reported as expired)",
            model.name,
            model.version,
            model.slot,
            exc,
        )
        return VerifiedModel(model, manifest, payload, expired=True)
    return VerifiedModel(model, manifest, payload, expired=False)


def _check_record(model: InstalledModel, manifest: Manifest) -> None:
    """Raise unless ``state.json``'s record names the model the manifest signs.

    Raises:
        StateError: a field differs.
    """
    recorded = (model.name, model.version, model.sha256, model.format)
    signed = (manifest.name, manifest.version, manifest.sha256, manifest.format)
    if recorded != signed:
        raise StateError(
            f"state.json records {model.name} v{model.version} ({model.format}, sha256 "
            f"{model.sha256[:12]}), the signed manifest in the slot is {manifest.name} "
            f"v{manifest.version} ({manifest.format}, sha256 {manifest.sha256[:12]})"
        )
