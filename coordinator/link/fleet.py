"""What the coordinator knows about devices, and how operators pick some of them.

Pure logic: no MQTT, no clock. The adapter that subscribes to the status topics
feeds this module with decoded messages and the current time.

Workflow:

* Every agent publishes a retained :class:`~edge_agent.protocol.Status` on
  ``fedge/v1/devices/<id>/status`` when it connects and whenever its capabilities
  change (a model installed); the broker publishes the agent's Last Will, the same
  message with ``online=False``, when the connection drops.
* The adapter decodes each status and calls :meth:`Fleet.update_status` with the
  header's ``sent_at`` and the coordinator's clock; an empty retained payload (the
  device was removed from the broker) becomes :meth:`Fleet.clear`; any other
  message from a device becomes :meth:`Fleet.touch`, so ``last_seen`` tells when
  the coordinator last heard *anything* from it.
* Commands pick devices with a :class:`Target` (``all``, ``device:a,b``,
  ``tag:gpu``) parsed from the command line, then :meth:`Target.select` the
  matching :class:`DeviceRecord` values from :meth:`Fleet.records`.

Ordering of statuses. Retained messages delivered on (re)subscription can race live
ones, so a status whose ``sent_at`` is older than the one held is stale: it is
ignored (``last_seen`` still moves). One exception: the Last Will is encoded when
the agent connects, so it is older than every status the agent publishes later on
the same connection. An offline status older than the held one is therefore still
honoured when it is newer than the last status held *before* the current online
period began (so it belongs to the current connection, not an earlier one); it
then only flips ``online`` to False and keeps the newer capabilities, since the
Will describes the device as it was at connect time. Both ``sent_at`` values come
from the same device clock, so skew between device and coordinator does not
matter here. And an online status for a device held offline is always taken, even
if older: a device whose clock went back (a reboot without a real-time clock) must
not look offline forever; its next Will is then honoured whatever its timestamp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from compress.manifest import TAG_RE
from coordinator.errors import TargetError
from edge_agent.protocol import ModelInfo, Status, is_valid_device_id

__all__ = ["DeviceRecord", "Fleet", "Target", "TargetKind"]

TargetKind = Literal["all", "device", "tag"]

_TARGET_FORMS = "'all', 'device:ID[,ID...]' or 'tag:TAG'"


@dataclass(frozen=True)
class DeviceRecord:
    """The coordinator's view of one device, from its latest applicable status.

    Attributes:
        device_id: The device id (also its MQTT username).
        online: Whether the agent is connected, as far as the coordinator knows.
        agent_version: The agent's version string.
        hardware: Facts reported by the agent (read-only mapping).
        runtimes: Inference runtimes available on the device.
        tags: Hardware/deployment tags.
        models: Installed models.
        last_seen: Coordinator clock (unix seconds) when it last heard anything
            from the device.
        status_sent_at: Device clock (unix seconds) at which the held status was
            sent.
        train_examples: Local examples the device can train on (0: it does not
            take part in federated rounds).
        train_models: PyTorch model specs (canonical ``module:function``) the
            device can train (empty: no torch, built-in families only).
        keyset_version: The version of the key set the device trusts (None: it
            trusts fixed key files, or its agent predates key sets).
    """

    device_id: str
    online: bool
    agent_version: str
    hardware: Mapping[str, str | int | float]
    runtimes: tuple[str, ...]
    tags: tuple[str, ...]
    models: tuple[ModelInfo, ...]
    last_seen: float
    status_sent_at: float
    train_examples: int = 0
    train_models: tuple[str, ...] = ()
    keyset_version: int | None = None

    @classmethod
    def from_status(
        cls, device_id: str, status: Status, *, sent_at: float, now: float
    ) -> DeviceRecord:
        """Build a record from a decoded status message.

        Args:
            device_id: The device the status is about (from the topic).
            status: The decoded message.
            sent_at: The message header's ``sent_at``.
            now: The coordinator's current time, unix seconds.

        Returns:
            The record.
        """
        return cls(
            device_id=device_id,
            online=status.online,
            agent_version=status.agent_version,
            hardware=MappingProxyType(dict(status.hardware)),
            runtimes=tuple(status.runtimes),
            tags=tuple(status.tags),
            models=tuple(status.models),
            last_seen=now,
            status_sent_at=sent_at,
            train_examples=status.train_examples,
            train_models=tuple(status.train_models),
            keyset_version=status.keyset_version,
        )

    @property
    def can_train(self) -> bool:
        """Whether the device can take part in a federated round now (online, has data)."""
        return self.online and self.train_examples > 0

    def can_train_model(self, spec: str) -> bool:
        """Whether the device can take part in a round of a model now: it can train
        (:attr:`can_train`) and, for a PyTorch model (``spec`` not empty), lists
        the canonical spec among its :attr:`train_models`."""
        return self.can_train and (not spec or spec in self.train_models)

    def model_version(self, name: str) -> int | None:
        """Give the installed version of a model.

        Args:
            name: The model name.

        Returns:
            The version, or None when the device does not report that model.
        """
        for model in self.models:
            if model.name == name:
                return model.version
        return None


class Fleet:
    """Every device the coordinator has heard a status from, by id.

    Not thread-safe: the caller serialises access (one lock around the adapter's
    callbacks and the readers).
    """

    def __init__(self) -> None:
        """Start with no devices."""
        self._records: dict[str, DeviceRecord] = {}
        # Newest status sent_at held before the current online period began;
        # an offline status newer than this belongs to the current connection.
        self._online_floor: dict[str, float] = {}

    def update_status(
        self, device_id: str, status: Status, *, sent_at: float, now: float
    ) -> DeviceRecord:
        """Apply a status message (see the module docstring for ordering).

        Args:
            device_id: The device (from the topic; already validated).
            status: The decoded status.
            sent_at: The message header's ``sent_at`` (device clock).
            now: The coordinator's current time, unix seconds.

        Returns:
            The record now held: the new one, or the held one (with ``last_seen``
            bumped) when the status was stale.
        """
        held = self._records.get(device_id)
        if held is None:
            record = DeviceRecord.from_status(device_id, status, sent_at=sent_at, now=now)
            if status.online:
                self._online_floor[device_id] = -math.inf
        else:
            last_seen = max(held.last_seen, now)
            comes_back = status.online and not held.online
            if sent_at >= held.status_sent_at or comes_back:
                record = DeviceRecord.from_status(device_id, status, sent_at=sent_at, now=last_seen)
                if comes_back:
                    # A clock that went back (a reboot without an RTC) gives no floor.
                    self._online_floor[device_id] = (
                        held.status_sent_at if sent_at >= held.status_sent_at else -math.inf
                    )
            elif (
                not status.online
                and held.online
                and sent_at > self._online_floor.get(device_id, -math.inf)
            ):
                record = replace(held, online=False, last_seen=last_seen)
            else:
                record = replace(held, last_seen=last_seen)
        self._records[device_id] = record
        return record

    def clear(self, device_id: str) -> bool:
        """Forget a device (its retained status was cleared).

        Args:
            device_id: The device.

        Returns:
            True if the device was known.
        """
        self._online_floor.pop(device_id, None)
        return self._records.pop(device_id, None) is not None

    def touch(self, device_id: str, now: float) -> bool:
        """Note that a device sent something other than a status.

        Unknown devices are not added: only a status says what a device is.

        Args:
            device_id: The device.
            now: The coordinator's current time, unix seconds.

        Returns:
            True if the device is known (and ``last_seen`` was bumped).
        """
        held = self._records.get(device_id)
        if held is None:
            return False
        self._records[device_id] = replace(held, last_seen=max(held.last_seen, now))
        return True

    def get(self, device_id: str) -> DeviceRecord | None:
        """Give a device's record, or None if unknown."""
        return self._records.get(device_id)

    def records(self) -> list[DeviceRecord]:
        """Give every record, sorted by device id."""
        return [self._records[k] for k in sorted(self._records)]

    def __len__(self) -> int:
        """Give the number of known devices."""
        return len(self._records)

    def __contains__(self, device_id: object) -> bool:
        """Tell whether a device id is known."""
        return device_id in self._records


@dataclass(frozen=True)
class Target:
    """Which devices a command addresses.

    Build with :meth:`parse`. Selection includes offline devices: the caller
    decides what to do with them (a deployment marks them offline and resends when
    they come back).

    Attributes:
        kind: ``all``, ``device`` or ``tag``.
        values: The device ids (``device``), the tag (``tag``), or nothing.
        text: The text it was parsed from.
    """

    kind: TargetKind
    values: tuple[str, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse ``all``, ``device:ID[,ID...]`` or ``tag:TAG``.

        Surrounding whitespace is ignored, also around each id; a repeated id is
        kept once.

        Args:
            text: The operator's text.

        Returns:
            The target.

        Raises:
            TargetError: The text is none of the accepted forms, or an id or tag
                is malformed.
        """
        stripped = text.strip()
        if stripped == "all":
            return cls("all", (), stripped)
        prefix, sep, rest = stripped.partition(":")
        if sep and prefix == "device":
            ids = [part.strip() for part in rest.split(",")]
            bad = [i for i in ids if not is_valid_device_id(i)]
            if bad:
                raise TargetError(
                    f"bad target {text!r}: invalid device id {bad[0]!r}; use {_TARGET_FORMS}"
                )
            return cls("device", tuple(dict.fromkeys(ids)), stripped)
        if sep and prefix == "tag":
            tag = rest.strip()
            if TAG_RE.fullmatch(tag) is None:
                raise TargetError(f"bad target {text!r}: invalid tag {tag!r}; use {_TARGET_FORMS}")
            return cls("tag", (tag,), stripped)
        raise TargetError(f"bad target {text!r}: use {_TARGET_FORMS}")

    def matches(self, record: DeviceRecord) -> bool:
        """Tell whether a device is addressed by this target."""
        if self.kind == "all":
            return True
        if self.kind == "device":
            return record.device_id in self.values
        return self.values[0] in record.tags

    def select(self, records: Iterable[DeviceRecord]) -> list[DeviceRecord]:
        """Give the matching devices, online and offline, sorted by id."""
        return sorted((r for r in records if self.matches(r)), key=lambda r: r.device_id)

    def missing(self, records: Iterable[DeviceRecord]) -> list[str]:
        """Give the named device ids that are not among ``records``, in given order.

        Only ``device:`` targets name devices; other kinds never miss any.
        """
        if self.kind != "device":
            return []
        known = {r.device_id for r in records}
        return [i for i in self.values if i not in known]

    def describe(self) -> str:
        """Give the text the target was parsed from."""
        return self.text

    def __str__(self) -> str:
        """Same as :meth:`describe`."""
        return self.text
