"""Model updates on a device: deploys, chunked transfers, A/B installs, rollbacks.

The agent's worker thread owns one :class:`Updater` and hands it the commands and
chunks it receives; the updater keeps the transfer in progress and the installed
models, and speaks back through a :class:`Reporter` (``install_status`` events, the
retained status, chunk requests; :mod:`edge_agent.ota.reporter`). The rules it applies live in
:mod:`edge_agent.ota.installer`; files in :mod:`edge_agent.ota.staging` and
:mod:`edge_agent.ota.model_store`.

Deployment, as the device sees it::

    cmd: deploy ──> check_deploy ──(reject)──> install_status rejected + reason
                        │ accept: staging area created, its broadcast subscribed,
                        │ install_status accepted
    chunks (broadcast "fedge/v1/broadcast/<transfer_id>" or own "chunks" topic)
                        │ each written in place; progress every 10 %
                        │ nothing for stall_timeout_s (or after a restart or
                        │ reconnect): chunk_request for the missing ones, a window
                        │ at a time; after MAX_STALLS fruitless requests: failed
    complete ──> verifying ──> installing (A/B + health check) ──> installed
                                   └──(load or health check fails)──> rolled_back

``check_deploy`` includes the placement rule: with a fleet configured the fresh fleet
statement must name the model (``targeting``, from
:class:`~edge_agent.ota.fleet_guard.FleetGuard`); without one, a model under another
name must be above the slot floor. The rule is checked again before the install
(the statement may have changed during the download) and when a staged transfer
resumes at start-up.

Every outcome is reported after the files are in their final state (the staging area
gone, the state committed), so a report never promises more than the disk holds.
Restart (:meth:`Updater.restore`, the start-up check in
:mod:`edge_agent.ota.startup_check`): the committed state names the model to serve,
the previous one as a fallback. Both are re-verified against the signed manifest
kept in their slot (:mod:`edge_agent.ota.reverify`: signatures and threshold of the
trusted keys, the payload's length and sha256); a model that fails is not served,
is dropped from the state, logged as an error and reported as a ``failed``
``install_status`` under the deployment id ``startup-check`` (an expired one is
served, and reported there with the code ``expired``); a rollback re-verifies its
target the same way. The newest staged transfer is reopened with only the chunks
that still verify, or reported installed when the crash came after its commit.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from datetime import UTC, datetime
from pathlib import Path

from compress.errors import CompressError
from compress.manifest import Manifest
from compress.signing import SignedManifest, TrustedKeys
from compress.trust import DeviceProfile, verify_manifest
from edge_agent.config.agent import TransferConfig
from edge_agent.errors import AgentError, StateError, UntrustedModelError
from edge_agent.ota.fleet_guard import TrustSource, current_keys
from edge_agent.ota.installer import (
    AlreadyInstalled,
    Checkpoint,
    Targeting,
    check_deploy,
    check_placement,
    install,
)
from edge_agent.ota.model_store import InstalledModel, ModelStore
from edge_agent.ota.reporter import Reporter
from edge_agent.ota.reverify import ModelProblem, VerifiedModel, verify_installed
from edge_agent.ota.staging import StagedTransfer, TransferInfo, list_transfers
from edge_agent.ota.startup_check import STARTUP_CHECK, restore_installed
from edge_agent.protocol import (
    Chunk,
    ChunkRequest,
    Deploy,
    InstallState,
    Rollback,
    broadcast_topic,
)
from edge_agent.runtime.base import ModelRuntime
from edge_agent.runtime.loader import load_model
from edge_agent.serving.server import LoadedModel, ModelServer
from edge_agent.transport.link import DeviceLink

__all__ = ["MAX_STALLS", "STARTUP_CHECK", "Reporter", "Transfer", "Updater"]

logger = logging.getLogger(__name__)

MAX_STALLS = 12
"""Requests for missing chunks in a row without any progress before a transfer fails."""
PROGRESS_STEPS = 10


@dataclass
class Transfer:
    """The transfer being downloaded."""

    staged: StagedTransfer
    manifest: Manifest
    deployment_id: str
    deadline: float
    pulling: bool = False
    stalls: int = 0
    outstanding: set[int] = field(default_factory=set)
    last_progress: int = -1


class Updater:
    """Deploys, transfers, installs and rollbacks of one device (one thread only)."""

    def __init__(
        self,
        *,
        store: ModelStore,
        staging_root: Path,
        trusted: TrustSource,
        device: DeviceProfile,
        server: ModelServer,
        link: DeviceLink,
        reporter: Reporter,
        config: TransferConfig,
        clock: Callable[[], float],
        checkpoint: Checkpoint,
        targeting: Targeting | None = None,
    ) -> None:
        """Wire the updater to the agent's parts (nothing happens until called).

        ``trusted`` is the trusted keys, or a function that returns the current ones
        (a device whose key set rotates while it runs). ``targeting`` is the fleet
        statement check (:meth:`~edge_agent.ota.fleet_guard.FleetGuard.require_targeted`)
        when a fleet is configured; see :func:`~edge_agent.ota.installer.check_placement`.
        """
        self._store = store
        self._staging_root = staging_root
        self._trust_source = trusted
        self._device = device
        self._server = server
        self._link = link
        self._reporter = reporter
        self._config = config
        self._clock = clock
        self._checkpoint = checkpoint
        self._targeting = targeting
        self.transfer: Transfer | None = None
        self.problems: list[ModelProblem] = []
        """What the start-up check (or a refused rollback) found wrong with installed
        models, for ``/v1/health``."""
        self._served_expires: datetime | None = None

    @property
    def _trusted(self) -> TrustedKeys:
        """The keys trusted now (asked afresh for each decision)."""
        return current_keys(self._trust_source)

    # ------------------------------------------------------------------ restore

    def restore(self) -> None:
        """Serve the committed model and reopen a staged transfer (at start-up)."""
        self._restore_model()
        self._restore_transfer()

    def _restore_model(self) -> None:
        """Serve the first installed model that re-verifies (see
        :func:`~edge_agent.ota.startup_check.restore_installed`)."""
        self.problems = restore_installed(
            self._store,
            activate=self._activate,
            verify=lambda model: verify_installed(
                self._store, model, trusted=self._trusted, now=self._now()
            ),
            reporter=self._reporter,
        )

    def _activate(self, model: InstalledModel) -> VerifiedModel:
        """Re-verify an installed model against its signed manifest, load and serve it.

        Raises:
            UntrustedModelError: the re-verification failed (nothing changes).
            ModelRuntimeError: the runtime cannot load it (nothing changes).
        """
        verified = verify_installed(self._store, model, trusted=self._trusted, now=self._now())
        self._serve(model, load_model(model.format, verified.payload), verified.manifest)
        self._served_expires = verified.manifest.expires
        return verified

    def serving_expired(self) -> bool:
        """Whether the manifest of the model being served has expired."""
        expires = self._served_expires
        return expires is not None and expires <= self._now()

    def _serve(self, model: InstalledModel, runtime: ModelRuntime, manifest: Manifest) -> None:
        self._server.activate(
            LoadedModel(
                name=model.name,
                version=model.version,
                sha256=model.sha256,
                format=model.format,
                slot=model.slot,
                runtime=runtime,
                installed_at=model.installed_at,
                manifest=manifest,
            )
        )

    def _restore_transfer(self) -> None:
        directories = list_transfers(self._staging_root)
        for directory in directories[:-1]:  # only the newest one may continue
            logger.info("discarding older staged transfer %s", directory.name[:12])
            shutil.rmtree(directory, ignore_errors=True)
        if not directories:
            return
        current = self._store.state.current
        done = TransferInfo.read(directories[-1])
        if current is not None and done is not None and current.sha256 == done.transfer_id:
            # Crashed after the commit, before cleaning up (the payload already moved
            # into its slot): report the success.
            shutil.rmtree(directories[-1], ignore_errors=True)
            self._reporter.report(done.deployment_id, InstallState.INSTALLED, current)
            return
        staged = StagedTransfer.open_or_discard(directories[-1])
        if staged is None:
            return
        info = staged.info
        try:
            manifest = verify_manifest(
                SignedManifest.from_bytes(staged.manifest_blob),
                self._trusted,
                now=self._now(),
                installed_version=None,
                device=self._device,
            )
            highest = self._store.state.highest_version(manifest.name)
            if highest is not None and manifest.version <= highest:
                raise StateError(f"{manifest.name} v{highest} was installed meanwhile")
            check_placement(manifest, self._store.state, now=self._now(), targeting=self._targeting)
        except (CompressError, AgentError) as exc:
            logger.info("dropping staged transfer %s: %s", info.transfer_id[:12], exc)
            staged.discard()
            self._report_error(info.deployment_id, InstallState.REJECTED, exc)
            return
        transfer = Transfer(staged, manifest, info.deployment_id, deadline=0.0, pulling=True)
        self._set_transfer(transfer)

    # ------------------------------------------------------------- connectivity

    def on_connected(self) -> None:
        """Back online: say where the transfer stands and carry on with it."""
        transfer = self.transfer
        if transfer is None:
            return
        self._report_transfer(transfer, force=True)
        if transfer.staged.complete:
            self._install(transfer)
        else:
            transfer.pulling = True
            self._request_missing(transfer)

    @property
    def deadline(self) -> float | None:
        """When (monotonic seconds) :meth:`on_deadline` wants to run, if ever."""
        return self.transfer.deadline if self.transfer is not None else None

    def on_deadline(self) -> None:
        """No chunk for a while: ask again, or give up when nothing comes any more."""
        transfer = self.transfer
        if transfer is None:
            return
        transfer.stalls += 1
        expired = transfer.manifest.expires <= self._now()
        if transfer.stalls <= MAX_STALLS and not expired:
            self._request_missing(transfer)
            return
        reason = (
            "the manifest expired during the download"
            if expired
            else f"no chunks arrived for {transfer.stalls} requests in a row"
        )
        logger.warning("giving up transfer %s: %s", transfer.staged.info.transfer_id[:12], reason)
        self._set_transfer(None)  # cleaned up before anyone hears of it
        self._reporter.report(
            transfer.deployment_id,
            InstallState.FAILED,
            transfer.manifest,
            code="expired" if expired else "stalled",
            reason=reason,
        )

    def wants_broadcast(self, name: str) -> bool:
        """Whether a broadcast topic's messages are for the transfer in progress."""
        return self.transfer is not None and name == self.transfer.staged.info.transfer_id

    def close(self) -> None:
        """Close the staging files (the worker has stopped; the files stay)."""
        if self.transfer is not None:
            self.transfer.staged.close()

    # ------------------------------------------------------------------ deploys

    def on_deploy(self, deploy: Deploy) -> None:
        """Check a deploy's manifest; start (or resume) its transfer, or refuse it."""
        logger.info(
            "deploy %s: transfer %s, %d bytes",
            deploy.deployment_id,
            deploy.transfer_id[:12],
            deploy.total_size,
        )
        try:
            manifest = check_deploy(
                deploy,
                trusted=self._trusted,
                device=self._device,
                store=self._store,
                now=self._now(),
                targeting=self._targeting,
            )
        except AlreadyInstalled as done:
            self._reporter.report(deploy.deployment_id, InstallState.INSTALLED, done.model)
            return
        except (CompressError, AgentError) as exc:
            logger.warning("rejected deploy %s: %s", deploy.deployment_id, exc)
            self._report_error(deploy.deployment_id, InstallState.REJECTED, exc)
            return
        current = self.transfer
        if current is not None and _same_transfer(current, deploy):
            self._resume(current, deploy.deployment_id)
            return
        if current is not None:
            self._set_transfer(None)
            self._report_superseded(current.deployment_id, f"superseded by {deploy.deployment_id}")
        info = TransferInfo(
            deployment_id=deploy.deployment_id,
            transfer_id=deploy.transfer_id,
            total_size=deploy.total_size,
            chunk_size=deploy.chunk_size,
            chunk_count=deploy.chunk_count,
        )
        try:
            staged = StagedTransfer.create(self._staging_root, info, deploy.manifest)
        except StateError as exc:
            self._report_error(deploy.deployment_id, InstallState.FAILED, exc)
            return
        transfer = Transfer(
            staged,
            manifest,
            deploy.deployment_id,
            deadline=time.monotonic() + self._config.stall_timeout_s,
        )
        self._set_transfer(transfer)
        self._report_transfer(transfer, force=True, state=InstallState.ACCEPTED)

    def _resume(self, transfer: Transfer, deployment_id: str) -> None:
        """A deploy of the transfer in progress was (re)sent: carry on under its id."""
        if transfer.deployment_id != deployment_id:
            self._report_superseded(transfer.deployment_id, f"continued as {deployment_id}")
            try:
                transfer.staged.relabel(deployment_id)
            except StateError as exc:
                logger.warning("%s (carrying on)", exc)
            transfer.deployment_id = deployment_id
        self._report_transfer(transfer, force=True)
        transfer.pulling = True
        transfer.stalls = 0
        self._request_missing(transfer)

    def on_chunk(self, chunk: Chunk) -> None:
        """Store a chunk of the transfer in progress; install when it is complete."""
        transfer = self.transfer
        if transfer is None or not transfer.staged.matches(chunk):
            logger.debug("chunk %d of an unknown transfer dropped", chunk.index)
            return
        staged = transfer.staged
        try:
            is_new = staged.write(chunk)
        except StateError as exc:
            logger.error("transfer %s: %s", staged.info.transfer_id[:12], exc)
            self._set_transfer(None)
            self._report_error(transfer.deployment_id, InstallState.FAILED, exc)
            return
        if not is_new:
            return
        self._checkpoint(f"chunk-{staged.held}")
        transfer.stalls = 0
        transfer.deadline = time.monotonic() + self._config.stall_timeout_s
        if staged.complete:
            self._install(transfer)
            return
        self._report_transfer(transfer)
        transfer.outstanding.discard(chunk.index)
        if transfer.pulling and len(transfer.outstanding) <= self._config.window // 2:
            self._request_missing(transfer)

    def _request_missing(self, transfer: Transfer) -> None:
        window = self._config.window
        transfer.deadline = time.monotonic() + self._config.stall_timeout_s
        transfer.pulling = True
        wanted = [
            index
            for index in transfer.staged.missing(window * 2)
            if index not in transfer.outstanding
        ][: window - len(transfer.outstanding)]
        if not wanted:
            # Everything asked for is overdue: ask again.
            transfer.outstanding.clear()
            wanted = transfer.staged.missing(window)
        if not wanted:
            return
        request = ChunkRequest(transfer_id=transfer.staged.info.transfer_id, indices=tuple(wanted))
        if self._reporter.request_chunks(request):
            transfer.outstanding.update(wanted)
            logger.debug("requested chunks %s", wanted)

    def _set_transfer(self, transfer: Transfer | None) -> None:
        """Replace the current transfer: discard the old one, follow the new one's chunks."""
        old = self.transfer
        if old is not None and old is not transfer:
            self._link.unsubscribe(broadcast_topic(old.staged.info.transfer_id))
            old.staged.discard()
        self.transfer = transfer
        if transfer is not None:
            # Before any answer goes out, so the broadcast cannot outrun the subscription.
            self._link.subscribe(broadcast_topic(transfer.staged.info.transfer_id))

    # ------------------------------------------------------------------ install

    def _install(self, transfer: Transfer) -> None:
        self._report_transfer(transfer, force=True, state=InstallState.VERIFYING)
        self._report_transfer(transfer, force=True, state=InstallState.INSTALLING)
        try:
            outcome = self._install_staged(transfer)
        finally:
            self._set_transfer(None)  # whatever happened, the staging area goes first
        outcome()

    def _install_staged(self, transfer: Transfer) -> Callable[[], None]:
        """Install; return the report to send once the staging area is gone.

        The placement rule is checked again first: the fleet statement may have
        changed (or expired) during the download.
        """
        manifest, deployment_id = transfer.manifest, transfer.deployment_id
        try:
            check_placement(manifest, self._store.state, now=self._now(), targeting=self._targeting)
            model, runtime = install(
                transfer.staged,
                manifest,
                store=self._store,
                installed_at=self._clock(),
                checkpoint=self._checkpoint,
            )
        except (CompressError, StateError) as exc:
            logger.error("install of %s v%d failed: %s", manifest.name, manifest.version, exc)
            failed = exc
            return lambda: self._report_error(deployment_id, InstallState.FAILED, failed, manifest)
        except AgentError as exc:
            logger.error(
                "%s v%d not installed, keeping the current model: %s",
                manifest.name,
                manifest.version,
                exc,
            )
            refused = exc
            return lambda: self._report_error(
                deployment_id, InstallState.ROLLED_BACK, refused, manifest
            )
        self._serve(model, runtime, manifest)

        def installed() -> None:
            self._reporter.report(deployment_id, InstallState.INSTALLED, model)
            self._reporter.announce()

        self._served_expires = manifest.expires
        return installed

    # ----------------------------------------------------------------- rollback

    def on_rollback(self, command: Rollback, command_id: str) -> None:
        """Go back to the previous good model; answered as ``rollback-<command id>``."""
        deployment_id = f"rollback-{command_id}"
        state = self._store.state
        current, previous = state.current, state.previous
        transfer = self.transfer
        if transfer is not None and transfer.manifest.name == command.model:
            logger.info("rollback of %s cancels the transfer in progress", command.model)
            self._set_transfer(None)
            self._reporter.report(
                transfer.deployment_id,
                InstallState.FAILED,
                None,
                code="cancelled",
                reason="cancelled by a rollback",
            )
        if current is None or current.name != command.model:
            self._reporter.report(
                deployment_id,
                InstallState.FAILED,
                None,
                code="not_installed",
                reason=f"{command.model} is not the installed model",
            )
            return
        if previous is None:
            self._reporter.report(
                deployment_id,
                InstallState.FAILED,
                current,
                code="no_previous_model",
                reason="no previous model to go back to",
            )
            return
        try:
            self._activate(previous)
            self._store.commit(dc_replace(state, current=previous, previous=None))
        except (AgentError, CompressError) as exc:
            if isinstance(exc, UntrustedModelError):
                logger.error("rollback of %s refused: %s", command.model, exc)
                self.problems.append(ModelProblem.of(previous, exc.code, str(exc), served=False))
                self._store.commit(dc_replace(state, previous=None))
            if self._server.active is not None and self._server.active.slot != current.slot:
                self._activate(current)
            self._report_error(deployment_id, InstallState.FAILED, exc)
            return
        logger.warning(
            "rolled back %s from v%d to v%d (%s)",
            command.model,
            current.version,
            previous.version,
            command.reason,
        )
        self._reporter.report(
            deployment_id, InstallState.ROLLED_BACK, previous, reason=command.reason or None
        )
        self._reporter.announce()

    # ------------------------------------------------------------------ helpers

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _report_error(
        self,
        deployment_id: str,
        state: InstallState,
        exc: CompressError | AgentError,
        model: InstalledModel | Manifest | None = None,
    ) -> None:
        self._reporter.report(deployment_id, state, model, code=exc.code, reason=str(exc))

    def _report_superseded(self, deployment_id: str, reason: str) -> None:
        """Report ``deployment_id`` failed because a newer deploy took its place."""
        self._reporter.report(
            deployment_id, InstallState.FAILED, None, code="superseded", reason=reason
        )

    def _report_transfer(
        self, transfer: Transfer, *, force: bool = False, state: InstallState | None = None
    ) -> None:
        staged = transfer.staged
        total = staged.info.chunk_count
        step = staged.held * PROGRESS_STEPS // max(total, 1)
        if not force and step == transfer.last_progress:
            return
        transfer.last_progress = step
        self._reporter.report(
            transfer.deployment_id,
            state or InstallState.DOWNLOADING,
            transfer.manifest,
            held=staged.held,
            total=total,
        )


def _same_transfer(transfer: Transfer, deploy: Deploy) -> bool:
    """Whether a deploy names exactly the transfer in progress (so it can go on)."""
    info = transfer.staged.info
    return (
        info.transfer_id == deploy.transfer_id
        and info.chunk_size == deploy.chunk_size
        and transfer.staged.manifest_blob == deploy.manifest
    )
