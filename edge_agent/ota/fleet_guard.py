"""The device's side of fleet statements: hold the fresh one, vouch for deploys, say ``stale``.

A device with a fleet configured (``[trust] fleet``, ``--fleet``) holds one
:class:`FleetGuard`. The coordinator publishes a short-lived signed statement per
fleet, retained, on ``broadcast_topic(statement_broadcast(fleet))``
(:mod:`compress.statement`); the agent subscribes to it for as long as it runs.

Workflow:

1. Start-up: the last accepted statement is read back from
   ``data_dir/trust/statement.fss`` (its signed bytes). It is checked against the
   trusted keys and the fleet id, not for freshness: even an expired one keeps its
   version as the floor, so a restart does not reopen the door to older statements.
   A file that fails is logged and ignored.
2. Each ``fleet_statement`` message (:meth:`FleetGuard.on_statement`): the bytes
   the guard already holds (the broker re-delivers the retained message on each
   reconnect) are ignored; anything else must pass
   :func:`compress.statement.verify_statement` (a trusted key's signature, this
   fleet, not expired, a version strictly above the last accepted). A refusal is
   logged with its code; an accepted statement replaces the held one and is
   written atomically before it is used.
3. Deploys: :meth:`FleetGuard.require_targeted` is the ``targeting`` check of
   :func:`edge_agent.ota.installer.check_deploy`: no statement held raises
   :class:`~compress.errors.NoStatementError` (``no_statement``), an expired one
   :class:`~compress.errors.StaleStatementError` (``stale_statement``), one that
   does not name the manifest's name, version and sha256
   :class:`~compress.errors.NotTargetedError` (``not_targeted``).
4. ``stale``: the device is stale while it holds no statement or only an expired
   one (a frozen or cut-off coordinator). The agent's worker wakes at
   :meth:`FleetGuard.seconds_to_expiry` and calls :meth:`FleetGuard.stale_changed`;
   on a change it republishes its retained status (``stale`` field), and it puts the
   flag in telemetry and ``/v1/health``.

Without a fleet configured the guard is disabled: it subscribes to nothing, vouches
for nothing (the installer's slot-floor rule applies instead) and is never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.errors import CompressError, NoStatementError
from compress.fileio import read_bounded
from compress.manifest import Manifest, format_time
from compress.signing import TrustedKeys
from compress.statement import (
    MAX_SIGNED_STATEMENT_BYTES,
    FleetStatement,
    SignedStatement,
    check_authentic,
    check_fresh,
    check_targeted,
    verify_statement,
)
from edge_agent.errors import StateError
from edge_agent.ota.records import write_state_file
from edge_agent.protocol.messages_fleet import FleetStatementMessage
from edge_agent.protocol.topics import broadcast_topic, statement_broadcast

__all__ = ["STATEMENT_FILE", "FleetGuard", "TrustSource", "current_keys"]

logger = logging.getLogger(__name__)

STATEMENT_FILE = Path("trust") / "statement.fss"
"""Where, under the data directory, the last accepted signed statement is kept."""

TrustSource = TrustedKeys | Callable[[], TrustedKeys]
"""The trusted keys, or a function that returns the current ones (a rotating key set)."""


def current_keys(source: TrustSource) -> TrustedKeys:
    """The keys trusted now (asked afresh for each decision)."""
    return source if isinstance(source, TrustedKeys) else source()


class FleetGuard:
    """The fleet statement a device holds (one worker thread uses it)."""

    def __init__(
        self,
        fleet: str | None,
        data_dir: Path,
        *,
        trusted: TrustSource,
        clock: Callable[[], float],
    ) -> None:
        """Read back the last accepted statement (when a fleet is configured).

        Args:
            fleet: The device's fleet id (already validated by the config), or None.
            data_dir: The agent's data directory.
            trusted: The trusted keys, or a function returning the current ones.
            clock: Wall clock, unix seconds.
        """
        self.fleet = fleet
        self._path = data_dir / STATEMENT_FILE
        self._trusted = trusted
        self._clock = clock
        self._held: FleetStatement | None = None
        self._held_bytes = b""
        self._stale_reported = False
        if fleet is not None:
            self._load(fleet)

    @property
    def enabled(self) -> bool:
        """Whether a fleet is configured (statements are enforced)."""
        return self.fleet is not None

    @property
    def held(self) -> FleetStatement | None:
        """The last accepted statement (possibly expired), if any."""
        return self._held

    def subscriptions(self) -> tuple[str, ...]:
        """The retained statement topic to subscribe to permanently (none without a fleet)."""
        return () if self.fleet is None else (broadcast_topic(statement_broadcast(self.fleet)),)

    def wants_broadcast(self, name: str) -> bool:
        """Whether a broadcast name is this fleet's statement topic."""
        return self.fleet is not None and name == statement_broadcast(self.fleet)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _load(self, fleet: str) -> None:
        if not self._path.exists():
            logger.info("fleet %s: no fleet statement held yet", fleet)
            return
        try:
            data = read_bounded(
                self._path, max_bytes=MAX_SIGNED_STATEMENT_BYTES, error=StateError, what="statement"
            )
            statement = check_authentic(
                SignedStatement.from_bytes(data), current_keys(self._trusted), fleet=fleet
            )
        except (StateError, CompressError) as exc:
            logger.error("ignoring the kept fleet statement %s: %s", self._path, exc)
            return
        self._held, self._held_bytes = statement, data
        logger.info("fleet %s: holding %s", fleet, statement.describe())

    # ----------------------------------------------------------------- statements

    def on_statement(self, message: FleetStatementMessage) -> bool:
        """Verify a received statement and hold it; True if it replaced the held one.

        A refusal (wrong signature or fleet, expired, replayed) is logged with its code
        and changes nothing. A statement that cannot be written is still held (it is
        authentic), and the failure is logged.
        """
        if self.fleet is None:
            logger.warning("ignoring a fleet statement: no fleet is configured")
            return False
        if message.statement == self._held_bytes:
            return False  # the retained statement again (a reconnect)
        held = self._held
        try:
            statement = verify_statement(
                SignedStatement.from_bytes(message.statement),
                current_keys(self._trusted),
                fleet=self.fleet,
                now=self._now(),
                last_version=held.version if held is not None else None,
            )
        except CompressError as exc:
            logger.warning("refused a fleet statement: %s: %s", exc.code, exc)
            return False
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_state_file(self._path, message.statement, verb="keep the fleet statement in")
        except (OSError, StateError) as exc:
            logger.error("accepted %s but cannot keep it: %s", statement.describe(), exc)
        self._held, self._held_bytes = statement, message.statement
        logger.info("accepted %s", statement.describe())
        return True

    def require_targeted(self, manifest: Manifest, now: datetime) -> None:
        """Raise unless the fresh held statement names ``manifest`` exactly.

        Raises:
            NoStatementError: no statement has been accepted.
            StaleStatementError: the held statement has expired.
            NotTargetedError: it does not name this name, version and sha256.
        """
        held = self._held
        if held is None:
            raise NoStatementError(
                f"fleet {self.fleet}: no fleet statement received yet, so nothing is "
                "targeted at this device"
            )
        check_fresh(held, now=now)
        check_targeted(held, manifest)

    # ---------------------------------------------------------------------- stale

    def stale(self) -> bool:
        """Whether a fleet is configured and no fresh statement is held."""
        if self.fleet is None:
            return False
        held = self._held
        return held is None or held.expires <= self._now()

    def seconds_to_expiry(self) -> float | None:
        """Seconds until the held fresh statement expires (None: nothing to wait for)."""
        held = self._held
        if self.fleet is None or held is None:
            return None
        left = (held.expires - self._now()).total_seconds()
        return left if left > 0 else None

    def stale_changed(self) -> bool:
        """Whether :meth:`stale` changed since the last call (logs the change)."""
        stale = self.stale()
        if stale == self._stale_reported:
            return False
        self._stale_reported = stale
        if stale:
            held = self._held
            since = f"expired at {format_time(held.expires)}" if held else "none received"
            logger.warning("fleet %s: no fresh fleet statement (%s): stale", self.fleet, since)
        else:
            logger.info("fleet %s: fresh fleet statement held", self.fleet)
        return True

    def to_json(self) -> dict[str, Any]:
        """For ``/v1/health``: the fleet, the held statement's version and expiry, stale."""
        held = self._held
        return {
            "fleet": self.fleet,
            "statement_version": held.version if held is not None else None,
            "statement_expires": format_time(held.expires) if held is not None else None,
            "stale": self.stale(),
        }
