"""The ``[fleet]`` table of ``coordinator.toml``: the fleet statement the service keeps.

With ``id`` set, ``fedge coordinator serve`` publishes a signed fleet statement for
that fleet (:mod:`coordinator.delivery.fleet_statement`), retained, refreshed at
half its ``lifetime_s``, and names every artifact it deploys (one-shot or rollout
stage) in it before the deploy goes out; a rollback names the model's previous
target again. Devices configured with ``trust.fleet = "<id>"`` install only what
the fresh statement names. Workflow::

    fleet = fleet_config(sources.section("fleet"), db=db)   # None when no id
    settings = fleet.load()                                  # reads the keys
    FleetService(..., settings=ServiceSettings(fleet=settings))

The keys are private signing keys whose public halves are in the devices' trusted
key set (one signature is enough for a statement; it can only narrow what
installs, since each manifest still needs the full threshold). Keep them on the
coordinator's machine only, readable by the service alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.keys import load_signing_key, read_key_password_file
from coordinator.delivery.fleet_statement import (
    MAX_LIFETIME_S,
    MIN_LIFETIME_S,
    StatementSettings,
)
from coordinator.errors import FleetStatementError, ServiceConfigError
from coordinator.service.config_schema import SERVICE_SCHEMA
from edge_agent.config.values import kind_of
from edge_agent.errors import ProtocolError
from edge_agent.protocol.topics import validate_fleet_id

__all__ = ["FleetConfig", "fleet_config"]


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The fleet statement settings, validated (keys not read yet).

    Attributes:
        fleet: The fleet id (the agents' ``trust.fleet``).
        keys: Private signing keys (PEM files) that sign every statement.
        lifetime_s: How long a statement is valid; re-published at half.
        state_file: Where the statement's targets and last version are kept.
        key_password_file: The password of encrypted keys (first line), or None.

    Raises:
        ServiceConfigError: a bad id, no key, or a lifetime out of range.
    """

    fleet: str
    keys: tuple[Path, ...]
    lifetime_s: float
    state_file: Path
    key_password_file: Path | None = None

    def __post_init__(self) -> None:
        try:
            validate_fleet_id(self.fleet)
        except ProtocolError as exc:
            raise ServiceConfigError(f"fleet.id: {exc}", key="fleet.id") from None
        if not self.keys or not all(isinstance(k, Path) for k in self.keys):
            raise ServiceConfigError(
                "fleet.keys: give the private key(s) that sign the fleet statement "
                '(keys = ["keys/statement.pem"]); their public keys must be trusted by '
                "the devices",
                key="fleet.keys",
            )
        lifetime = self.lifetime_s
        if (
            isinstance(lifetime, bool)
            or not isinstance(lifetime, int | float)
            or not MIN_LIFETIME_S <= lifetime <= MAX_LIFETIME_S
        ):
            shown = lifetime if isinstance(lifetime, int | float) else kind_of(lifetime)
            raise ServiceConfigError(
                f"fleet.lifetime_s must be {MIN_LIFETIME_S:g} to {MAX_LIFETIME_S:g} seconds, "
                f"got {shown}",
                key="fleet.lifetime_s",
            )
        object.__setattr__(self, "lifetime_s", float(lifetime))

    def load(self) -> StatementSettings:
        """Read the signing keys.

        Raises:
            ServiceConfigError: a key file is missing or not an Ed25519 private key, or
                an encrypted one without its password (or with a wrong one).
        """
        try:
            password = (
                None
                if self.key_password_file is None
                else read_key_password_file(self.key_password_file)
            )
            keys = tuple(load_signing_key(path, password) for path in self.keys)
            return StatementSettings(self.fleet, keys, self.lifetime_s, self.state_file)
        except (CompressError, FleetStatementError) as exc:
            raise ServiceConfigError(f"fleet.keys: {exc}", key="fleet.keys") from exc


def fleet_config(section: Mapping[str, Any], *, db: Path) -> FleetConfig | None:
    """The ``[fleet]`` table as a :class:`FleetConfig`, or None when it has no ``id``.

    ``state_file`` defaults to ``fleet-<id>.statement.json`` next to the database.

    Raises:
        ServiceConfigError: a bad value (see :class:`FleetConfig`).
    """
    fleet = section.get("id")
    if fleet is None:
        return None
    if not isinstance(fleet, str):
        raise ServiceConfigError(f"fleet.id must be a string, got {kind_of(fleet)}", key="fleet.id")
    keys: Sequence[Path] = section.get("keys") or ()
    state_file = section.get("state_file") or db.parent / f"fleet-{fleet}.statement.json"
    lifetime = section.get("lifetime_s", SERVICE_SCHEMA.default("fleet.lifetime_s"))
    password_file = section.get("key_password_file")
    return FleetConfig(fleet, tuple(keys), lifetime, state_file, password_file)
