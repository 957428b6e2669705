"""Deciding on a deploy, and installing a staged payload A/B with a health check.

Two steps, called by the agent's worker thread:

1. :func:`check_deploy` runs when a ``deploy`` command arrives, *before* anything is
   downloaded: the signed manifest must pass the DESIGN.md trust rules
   (:func:`compress.signing.verify_signatures`, then
   :func:`compress.trust.check_manifest`: threshold signatures, expiry, version
   strictly above the highest ever installed, device fit), and the deploy's
   unsigned transfer fields must agree with it (``transfer_id`` is the manifest's
   sha256, ``total_size`` its length). A deploy of exactly the model already
   current raises :class:`AlreadyInstalled`, so a re-sent command is answered
   "installed" instead of "rollback". Then :func:`check_placement` decides whether
   the model may take the serving position: with a fleet configured, only if the
   fresh fleet statement names its name, version and sha256
   (:class:`~edge_agent.ota.fleet_guard.FleetGuard`); without one, a model under
   another name than the serving one must have a version above the slot floor
   (:meth:`~edge_agent.ota.model_store.StoreState.slot_floor`), so an old manifest
   signed for another name (``digits-canary`` v1) cannot replace ``digits`` v5.
2. :func:`install` runs once every chunk is staged: the whole payload's length and
   sha256 are checked against the manifest (streamed, never more than the declared
   length), the payload moves into the free slot, the runtime loads it from there,
   the manifest's health check runs, and only then does one atomic write of
   ``state.json`` make it current. Any failure leaves the previous model current
   and the free slot emptied.

``checkpoint(name)`` is called between the steps (``payload-verified``,
``slot-written``, ``model-loaded``, ``health-checked``, ``committed``); it does
nothing in production and lets crash tests SIGKILL the agent at exact points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace as dc_replace
from datetime import datetime

from compress.errors import RollbackError, SlotRollbackError
from compress.manifest import Manifest
from compress.signing import SignedManifest, TrustedKeys, verify_signatures
from compress.trust import DeviceProfile, PayloadVerifier, check_manifest
from edge_agent.errors import InstallError, ModelRuntimeError, StateError, TransferError
from edge_agent.ota.health import run_health_check
from edge_agent.ota.model_store import InstalledModel, ModelStore, StoreState
from edge_agent.ota.staging import StagedTransfer
from edge_agent.protocol import Deploy
from edge_agent.runtime.base import ModelRuntime
from edge_agent.runtime.loader import load_model

__all__ = [
    "AlreadyInstalled",
    "Checkpoint",
    "Targeting",
    "check_deploy",
    "check_placement",
    "install",
    "no_checkpoint",
    "verify_staged_payload",
]

logger = logging.getLogger(__name__)

Checkpoint = Callable[[str], None]
"""A hook called with a step's name between install steps."""

Targeting = Callable[[Manifest, datetime], None]
"""Raises unless the fleet's fresh statement names the manifest (a fleet is configured)."""

_READ_BLOCK = 1024 * 1024


def no_checkpoint(_name: str) -> None:
    """The default checkpoint hook: does nothing."""
    return


class AlreadyInstalled(Exception):  # noqa: N818 - an outcome, not an error
    """The deploy names exactly the model that is already current."""

    def __init__(self, model: InstalledModel) -> None:
        """Carry the installed model."""
        super().__init__(f"{model.name} v{model.version} is already installed")
        self.model = model


def check_deploy(
    deploy: Deploy,
    *,
    trusted: TrustedKeys,
    device: DeviceProfile,
    store: ModelStore,
    now: datetime,
    targeting: Targeting | None = None,
) -> Manifest:
    """Decide whether to download a deploy's payload.

    ``targeting`` is the fleet's statement check when a fleet is configured (see
    :func:`check_placement`).

    Returns:
        The verified manifest.

    Raises:
        AlreadyInstalled: this exact model (name, version, sha256) is current.
        CompressError: the manifest fails a trust rule (its ``code`` says which),
            including :func:`check_placement`'s.
        TransferError: the deploy's transfer fields contradict the manifest.
    """
    signed = SignedManifest.from_bytes(deploy.manifest)
    state = store.state
    # Signatures first: the name that picks the rollback counter must be trusted.
    manifest = verify_signatures(signed, trusted)
    try:
        check_manifest(
            manifest, now=now, installed_version=state.highest_version(manifest.name), device=device
        )
    except RollbackError:
        current = state.current
        if current is not None and (current.name, current.version, current.sha256) == (
            manifest.name,
            manifest.version,
            manifest.sha256,
        ):
            raise AlreadyInstalled(current) from None
        raise
    check_placement(manifest, state, now=now, targeting=targeting)
    if deploy.transfer_id != manifest.sha256 or deploy.total_size != manifest.length:
        raise TransferError(
            f"the transfer ({deploy.total_size} bytes, sha256 {deploy.transfer_id[:12]}) "
            f"is not the payload the manifest signs ({manifest.length} bytes, sha256 "
            f"{manifest.sha256[:12]}): tampered or mismatched artifact"
        )
    return manifest


def check_placement(
    manifest: Manifest, state: StoreState, *, now: datetime, targeting: Targeting | None
) -> None:
    """Decide whether ``manifest``'s model may take the serving position.

    With a fleet configured (``targeting`` given), the fleet's fresh statement must
    name the manifest's name, version and sha256; it may name a model under another
    name, even below the slot floor (the statement is the coordinator's word on what
    this fleet runs now). Without one, a model under another name than the serving
    one must have a version above :meth:`StoreState.slot_floor`.

    Raises:
        NoStatementError, StaleStatementError, NotTargetedError: from ``targeting``.
        SlotRollbackError: another name, not above the slot floor, no fleet configured.
    """
    if targeting is not None:
        targeting(manifest, now)
        return
    current, floor = state.current, state.slot_floor()
    if current is not None and current.name != manifest.name and manifest.version <= floor:
        raise SlotRollbackError(
            f"{manifest.name} v{manifest.version} would replace {current.name} "
            f"v{current.version}, but a model under another name must be above the "
            f"slot floor v{floor} (or be named by a fleet statement)"
        )


def verify_staged_payload(transfer: StagedTransfer, manifest: Manifest) -> None:
    """Check the assembled payload's length and sha256 against the manifest.

    Raises:
        PayloadLengthError: the file is not the declared length.
        PayloadHashError: the sha256 differs.
        StateError: the file cannot be read.
    """
    verifier = PayloadVerifier(manifest)
    path = transfer.payload_path()
    try:
        with path.open("rb") as stream:
            while block := stream.read(min(_READ_BLOCK, verifier.remaining + 1)):
                verifier.update(block)
    except OSError as exc:
        raise StateError(f"cannot read staged payload {path}: {exc}") from exc
    verifier.finish()


def install(
    transfer: StagedTransfer,
    manifest: Manifest,
    *,
    store: ModelStore,
    installed_at: float,
    checkpoint: Checkpoint = no_checkpoint,
    threads: int = 1,
) -> tuple[InstalledModel, ModelRuntime]:
    """Install a complete staged transfer A/B; return the new current model and runtime.

    Raises:
        PayloadLengthError, PayloadHashError: the payload does not match the manifest.
        ModelRuntimeError: the runtime cannot load the model (previous model kept).
        HealthCheckError: the health check failed (previous model kept).
        StateError: the slot or state could not be written (previous model kept).
    """
    verify_staged_payload(transfer, manifest)
    checkpoint("payload-verified")
    transfer.sync()
    slot = store.prepare_slot()
    candidate = InstalledModel(
        slot=slot,
        name=manifest.name,
        version=manifest.version,
        sha256=manifest.sha256,
        format=manifest.format,
        installed_at=installed_at,
    )
    try:
        store.fill_slot(slot, transfer.payload_path(), transfer.manifest_blob)
        checkpoint("slot-written")
        runtime = load_model(manifest.format, store.read_payload(candidate), threads=threads)
        checkpoint("model-loaded")
        if manifest.health_check is not None:
            run_health_check(runtime, manifest.health_check)
        else:
            logger.warning("%s v%d has no health check", manifest.name, manifest.version)
        checkpoint("health-checked")
        state = store.state
        store.commit(
            dc_replace(state, current=candidate, previous=state.current).with_highest(
                manifest.name, manifest.version
            )
        )
    except (InstallError, ModelRuntimeError, StateError):
        store.discard_slot(slot)
        raise
    checkpoint("committed")
    logger.info("installed %s v%d in slot %s", manifest.name, manifest.version, slot)
    return candidate, runtime
