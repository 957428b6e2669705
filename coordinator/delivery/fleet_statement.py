"""Fleet statements on the coordinator side: build, sign, publish retained, keep fresh.

A fleet statement (:mod:`compress.statement`) tells every device of a fleet which
version and sha256 each model name should be *now*, and expires a few hours later.
A device with a fleet configured installs only what a fresh statement names, and
reports ``stale`` when its statement expires. This module is the coordinator's
half: it keeps the fleet's targets, signs a new statement whenever they change or
the published one has lived half its lifetime, and publishes it retained on
``fedge/v1/broadcast/fleet.<id>`` through the hub.

Workflow (what the service does when its config has a ``[fleet]`` table)::

    publisher = StatementPublisher(hub, StatementSettings("plant-a", keys))
    publisher.start()                       # publishes on every (re)connection, then
                                            # re-publishes at half the lifetime
    deliveries.announce_with(publisher)     # before a deploy: the statement names the
                                            # artifact; before a rollback: the previous
                                            # target of that model name
    publisher.stop()

1. :class:`StatementBook` is the pure part: the current target per model name, the
   targets each name had before (for rollbacks), and the last statement version.
   :meth:`StatementBook.name` sets a name's target; :meth:`StatementBook.revert`
   goes back to the previous one, once per deploy (a rollout may send several
   rollbacks of one name; only the first moves the statement).
2. Every statement gets a version above all before it, across restarts:
   :func:`next_version` is ``max(last + 1, unix time in ms)``, and the last one is
   saved with the book (``state_file``) when there is one.
3. :meth:`StatementPublisher.publish` signs the statement with every configured key
   (a device needs one trusted signature: these keys must be in the devices' key
   set), saves the book, then publishes. A publish that could not go out (the hub
   is disconnected) is retried by the refresh thread and on reconnection.

The one-shot ``fedge fleet publish`` and ``fedge deploy --fleet`` use the same
pieces without the thread: :func:`build_statement` and :func:`sign_statement`,
then one :meth:`~coordinator.link.port.Hub.publish_retained` (nothing refreshes
such a statement: it goes stale after its lifetime unless published again).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from compress.errors import CompressError
from compress.fileio import atomic_write, read_bounded
from compress.keys import SigningKey
from compress.manifest import Manifest
from compress.statement import (
    FleetStatement,
    SignedStatement,
    sign_statement,
)
from compress.statement import Target as StatementTarget
from coordinator.errors import FleetStatementError
from coordinator.link.port import Hub
from edge_agent.errors import ProtocolError
from edge_agent.protocol.messages_fleet import FleetStatementMessage
from edge_agent.protocol.topics import statement_broadcast, validate_fleet_id

__all__ = [
    "DEFAULT_LIFETIME_S",
    "KEPT_PREVIOUS",
    "MAX_LIFETIME_S",
    "MIN_LIFETIME_S",
    "StatementBook",
    "StatementPublisher",
    "StatementSettings",
    "build_statement",
    "load_book",
    "next_version",
    "sign_one",
    "statement_message",
]

logger = logging.getLogger(__name__)

DEFAULT_LIFETIME_S = 6 * 3600.0
"""How long a statement is valid by default: a device cut off from the coordinator
reports ``stale`` within six hours."""

MIN_LIFETIME_S = 2.0
"""Shortest lifetime accepted (statements carry whole seconds)."""

MAX_LIFETIME_S = 30 * 86400.0
"""Longest lifetime accepted: a statement is meant to be short-lived."""

KEPT_PREVIOUS = 8
"""Earlier targets kept per model name, for rollbacks."""

_STATE_MAX_BYTES = 1024 * 1024


def next_version(last: int, now: float) -> int:
    """The version of the next statement: above ``last`` and at least unix ms.

    The clock part keeps versions growing across restarts even without a state
    file (as long as the clock does not go back); ``last + 1`` keeps them growing
    when it does.
    """
    return max(last + 1, int(now * 1000))


def build_statement(
    fleet: str,
    targets: Mapping[str, StatementTarget],
    *,
    version: int,
    now: float,
    lifetime_s: float,
) -> FleetStatement:
    """A statement for ``fleet`` issued at ``now`` (whole seconds) and valid ``lifetime_s``.

    Raises:
        StatementError: a field out of range (too many targets, a bad version).
    """
    issued = datetime.fromtimestamp(math.floor(now), UTC)
    expires = issued + timedelta(seconds=math.ceil(lifetime_s))
    return FleetStatement(
        fleet=fleet, version=version, issued=issued, expires=expires, targets=dict(targets)
    )


def statement_message(signed: SignedStatement) -> FleetStatementMessage:
    """The wire message carrying a signed statement."""
    return FleetStatementMessage(statement=signed.to_bytes())


@dataclass(frozen=True)
class StatementSettings:
    """How a fleet's statements are made (the service's ``[fleet]`` table).

    Attributes:
        fleet: The fleet id (the agents' ``trust.fleet``).
        keys: Signing keys; each signs every statement. Devices accept a statement
            signed by one key of their trusted key set.
        lifetime_s: How long a statement is valid; it is re-published at half.
        state_file: Where the targets and the last version are kept across
            restarts (None: in memory only; versions still grow with the clock).

    Raises:
        FleetStatementError: a bad fleet id, no key, or a lifetime out of range.
    """

    fleet: str
    keys: tuple[SigningKey, ...]
    lifetime_s: float = DEFAULT_LIFETIME_S
    state_file: Path | None = None

    def __post_init__(self) -> None:
        try:
            validate_fleet_id(self.fleet)
        except ProtocolError as exc:
            raise FleetStatementError(f"fleet statement: {exc}") from None
        if not self.keys:
            raise FleetStatementError(
                f"fleet {self.fleet}: no signing key for its statements; give at least one"
            )
        if not MIN_LIFETIME_S <= self.lifetime_s <= MAX_LIFETIME_S:
            raise FleetStatementError(
                f"fleet {self.fleet}: a statement lifetime must be {MIN_LIFETIME_S:g} to "
                f"{MAX_LIFETIME_S:g} seconds, got {self.lifetime_s:g}"
            )

    @property
    def refresh_after_s(self) -> float:
        """Seconds after which a published statement is replaced: half its lifetime."""
        return self.lifetime_s / 2


@dataclass
class StatementBook:
    """What the fleet's statement says, and what it said before (see the module docstring).

    Attributes:
        fleet: The fleet id.
        version: The last statement version given out (0: none yet).
        targets: The current target of each model name.
        previous: Earlier targets of each name, oldest first (at most
            :data:`KEPT_PREVIOUS`).
        reverted: Names rolled back since their last :meth:`name`.
    """

    fleet: str
    version: int = 0
    targets: dict[str, StatementTarget] = field(default_factory=dict)
    previous: dict[str, list[StatementTarget]] = field(default_factory=dict)
    reverted: set[str] = field(default_factory=set)

    def name(self, name: str, target: StatementTarget) -> bool:
        """Make ``target`` the current one of ``name``; True if that changed anything."""
        self.reverted.discard(name)
        current = self.targets.get(name)
        if current == target:
            return False
        if current is not None:
            history = self.previous.setdefault(name, [])
            history.append(current)
            del history[:-KEPT_PREVIOUS]
        self.targets[name] = target
        return True

    def revert(self, name: str) -> StatementTarget | None:
        """Go back to the target ``name`` had before its last :meth:`name`, once.

        Returns:
            The target now current, or None when nothing changed (already rolled
            back since the last deploy, or no earlier target is known).
        """
        history = self.previous.get(name)
        if name in self.reverted or not history:
            return None
        self.targets[name] = history.pop()
        self.reverted.add(name)
        return self.targets[name]

    def take_version(self, now: float) -> int:
        """A new statement version (:func:`next_version`), remembered."""
        self.version = next_version(self.version, now)
        return self.version

    def to_json(self) -> bytes:
        """The book as JSON (what the state file holds)."""
        return json.dumps(
            {
                "fleet": self.fleet,
                "version": self.version,
                "targets": {n: t.to_dict() for n, t in sorted(self.targets.items())},
                "previous": {
                    n: [t.to_dict() for t in ts] for n, ts in sorted(self.previous.items())
                },
                "reverted": sorted(self.reverted),
            },
            indent=1,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, fleet: str) -> StatementBook:
        """Read a book written by :meth:`to_json` for ``fleet``.

        Raises:
            FleetStatementError: not such a book, or one of another fleet.
        """
        try:
            obj = json.loads(data)
            if obj["fleet"] != fleet:
                raise FleetStatementError(
                    f"the statement state is for fleet {obj['fleet']!r}, not {fleet!r}"
                )

            def target(item: Mapping[str, object]) -> StatementTarget:
                version, sha256 = item["version"], item["sha256"]
                if not isinstance(version, int) or not isinstance(sha256, str):
                    raise TypeError("a target needs an integer version and a sha256")
                return StatementTarget(version=version, sha256=sha256)

            version = obj["version"]
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise TypeError("version must be an integer >= 0")
            return cls(
                fleet=fleet,
                version=version,
                targets={str(n): target(t) for n, t in obj["targets"].items()},
                previous={str(n): [target(t) for t in ts] for n, ts in obj["previous"].items()},
                reverted={str(n) for n in obj["reverted"]},
            )
        except FleetStatementError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, CompressError) as exc:
            raise FleetStatementError(f"unreadable fleet statement state: {exc}") from None


def load_book(path: Path | None, fleet: str) -> StatementBook:
    """The book kept in ``path``, or an empty one when there is none (or no path).

    Raises:
        FleetStatementError: the file exists but cannot be read as a book of ``fleet``.
    """
    if path is None or not path.exists():
        return StatementBook(fleet)
    data = read_bounded(
        path, max_bytes=_STATE_MAX_BYTES, error=FleetStatementError, what="fleet statement state"
    )
    try:
        return StatementBook.from_json(data, fleet)
    except FleetStatementError as exc:
        raise FleetStatementError(f"{path}: {exc}") from None


class StatementPublisher:
    """Keeps one fleet's statement published and fresh (see the module docstring;
    thread-safe)."""

    def __init__(
        self,
        hub: Hub,
        settings: StatementSettings,
        *,
        clock: Callable[[], float] = time.time,
        check_s: float = 1.0,
    ) -> None:
        """Read the saved book, if any (nothing is published until :meth:`start`).

        Raises:
            FleetStatementError: the state file cannot be read.
        """
        self._hub = hub
        self.settings = settings
        self._clock = clock
        self._check_s = check_s
        self._lock = threading.Lock()
        self._book = load_book(settings.state_file, settings.fleet)
        self._current: SignedStatement | None = None
        self._published_at: float | None = None  # None: the last one did not go out
        self._reconnected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Publish now (the hub is normally connected), then on every reconnection,
        and refresh in a background thread.

        Raises:
            FleetStatementError: the statement cannot be built or its state saved.
        """
        self._stopping.clear()
        self._hub.add_connect_listener(self._reconnected.set)
        self.publish()
        self._thread = threading.Thread(
            target=self._run, name=f"fedge-statement-{self.settings.fleet}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing (idempotent); the last statement stays retained."""
        self._stopping.set()
        self._hub.remove_connect_listener(self._reconnected.set)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self._check_s):
            try:
                if self._reconnected.is_set():
                    self._reconnected.clear()
                    self.publish()
                else:
                    self.refresh_if_due()
            except Exception:  # a bug, or a full disk: log it and try again later
                logger.exception("fleet %s: publishing the statement failed", self.settings.fleet)

    # ------------------------------------------------------------------ the book

    @property
    def current(self) -> SignedStatement | None:
        """The last statement signed here (published or not), or None."""
        with self._lock:
            return self._current

    def targets(self) -> dict[str, StatementTarget]:
        """What the statement names now, by model name."""
        with self._lock:
            return dict(self._book.targets)

    def before_deploy(self, manifest: Manifest) -> None:
        """Name an artifact about to be sent (its name, version and sha256), published
        before the deploy command goes out."""
        target = StatementTarget(version=manifest.version, sha256=manifest.sha256)
        with self._lock:
            before = copy.deepcopy(self._book)
            changed = self._book.name(manifest.name, target)
            unpublished = self._published_at is None
        if changed or unpublished:
            logger.info("fleet %s: the statement now names %s v%d",
                        self.settings.fleet, manifest.name, manifest.version)  # fmt: skip
            self._publish_or_restore(before)

    def before_rollback(self, model: str) -> None:
        """A rollback of ``model`` is about to be sent: name its previous target."""
        with self._lock:
            before = copy.deepcopy(self._book)
            target = self._book.revert(model)
        if target is None:
            logger.info("fleet %s: rollback of %s leaves the statement as it is "
                        "(no earlier target, or rolled back already)",
                        self.settings.fleet, model)  # fmt: skip
            return
        logger.info("fleet %s: rollback: the statement names %s v%d again",
                    self.settings.fleet, model, target.version)  # fmt: skip
        self._publish_or_restore(before)

    def _publish_or_restore(self, before: StatementBook) -> None:
        """:meth:`publish`; if it fails, the book goes back to ``before`` (the deploy
        or rollback is not sent, so the statement must not name it later)."""
        try:
            self.publish()
        except FleetStatementError:
            with self._lock:
                self._book = before
            raise

    # --------------------------------------------------------------- publishing

    def refresh_if_due(self) -> bool:
        """Publish a new statement if none went out yet, or the last one is half-lived.

        Returns:
            True if a statement was published (or tried).
        """
        with self._lock:
            at = self._published_at
        if at is not None and self._clock() < at + self.settings.refresh_after_s:
            return False
        self.publish()
        return True

    def publish(self) -> SignedStatement:
        """Sign a new statement of the current targets, save the book and publish it.

        Returns:
            The signed statement (:attr:`current`), whether or not it went out; when
            it did not (disconnected), the next check tries again.

        Raises:
            FleetStatementError: the statement cannot be built or the state saved.
        """
        with self._lock:
            now = self._clock()
            try:
                statement = build_statement(
                    self.settings.fleet,
                    self._book.targets,
                    version=self._book.take_version(now),
                    now=now,
                    lifetime_s=self.settings.lifetime_s,
                )
                signed = sign_statement(statement, self.settings.keys)
                self._save()
            except CompressError as exc:
                error = FleetStatementError(f"fleet {self.settings.fleet}: {exc}")
                logger.error("statement not published: %s", error)
                raise error from exc
            except FleetStatementError as exc:
                logger.error("statement not published: %s", exc)
                raise
            self._current = signed
            name = statement_broadcast(self.settings.fleet)
            sent = self._hub.publish_retained(name, statement_message(signed)) > 0
            self._published_at = now if sent else None
        if sent:
            logger.info("published %s", statement.describe())
        else:
            logger.warning("fleet %s: statement v%d not published (disconnected); will retry",
                           self.settings.fleet, statement.version)  # fmt: skip
        return signed

    def _save(self) -> None:
        path = self.settings.state_file
        if path is None:
            return
        try:
            atomic_write(path, self._book.to_json(), mode=0o600)
        except OSError as exc:
            raise FleetStatementError(
                f"fleet {self.settings.fleet}: cannot save the statement state to {path}: {exc}"
            ) from exc


def sign_one(
    fleet: str,
    targets: Mapping[str, StatementTarget],
    keys: Sequence[SigningKey],
    *,
    now: float,
    lifetime_s: float,
    last_version: int = 0,
) -> SignedStatement:
    """One signed statement, for the one-shot commands (no book, no thread).

    Raises:
        FleetStatementError: a bad field or no key.
    """
    settings = StatementSettings(fleet, tuple(keys), lifetime_s)
    try:
        statement = build_statement(
            settings.fleet,
            targets,
            version=next_version(last_version, now),
            now=now,
            lifetime_s=settings.lifetime_s,
        )
        return sign_statement(statement, settings.keys)
    except CompressError as exc:
        raise FleetStatementError(f"fleet {fleet}: {exc}") from exc
