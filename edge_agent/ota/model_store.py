"""The agent's installed models: two slots (A/B) and one atomically replaced state file.

Layout under the data directory::

    state.json            which slot is current, which is the previous good one,
                          and the highest version ever installed per model name
    slots/a/payload       model bytes        slots/b/payload
    slots/a/manifest.fsm  signed manifest    slots/b/manifest.fsm

``state.json`` is the single commit point. An install writes the new model into the
slot that is *not* current, and only then replaces ``state.json`` (temp file, fsync,
``os.replace``, fsync of the directory), so after a crash at any moment the state
names either the old model or the new one, each complete in its slot. Before a slot
is overwritten, the state stops naming it as the rollback target, so the state
never points at a half-written slot either. Every slot is checked against its
recorded sha256 before it is served, and at start-up every model the agent would
serve is re-verified against the signed manifest kept next to it
(:mod:`edge_agent.ota.reverify`).

The highest-version counters implement rollback protection (DESIGN.md trust rule
3): they only grow, survive reinstalls and restarts, and are raised in the same
atomic write that makes a new version current. So does the slot floor
(:meth:`StoreState.slot_floor`): the highest version the device ever served under
*any* name, which a model under another name than the serving one must exceed
unless the fleet statement names it (:func:`edge_agent.ota.installer.check_placement`).
An older ``state.json`` without the ``floor`` field reads as floor 0 (the current
model's version still counts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write, fsync_directory, read_bounded
from compress.manifest import MAX_PAYLOAD_BYTES
from compress.signing import MAX_BLOB_BYTES
from edge_agent.errors import StateError
from edge_agent.ota.records import record_from_json, record_to_json, write_state_file

__all__ = ["SLOTS", "InstalledModel", "ModelStore", "StoreState"]

logger = logging.getLogger(__name__)

SLOTS = ("a", "b")
STATE_FILE = "state.json"
STATE_SCHEMA = 1
PAYLOAD_FILE = "payload"
MANIFEST_FILE = "manifest.fsm"
_MAX_STATE_BYTES = 1024 * 1024
_HASH_BLOCK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class InstalledModel:
    """A model sitting in a slot.

    Attributes:
        slot: ``a`` or ``b``.
        name: Model name.
        version: Model version.
        sha256: sha256 of the payload file.
        format: Model format (``onnx``, ``tflite``).
        installed_at: When it became current (unix seconds).
    """

    slot: str
    name: str
    version: int
    sha256: str
    format: str
    installed_at: float

    def to_json(self) -> dict[str, Any]:
        """JSON form for state.json."""
        return record_to_json(self)

    @classmethod
    def from_json(cls, obj: Any) -> InstalledModel:
        """Parse the JSON form.

        Raises:
            StateError: a field is missing or has the wrong type.
        """
        model = record_from_json(cls, obj, f"bad model entry in {STATE_FILE}")
        if model.slot not in SLOTS:
            raise StateError(f"bad slot {model.slot!r} in {STATE_FILE}")
        return model


@dataclass(frozen=True, slots=True)
class StoreState:
    """The content of state.json.

    Attributes:
        current: The model being served, if any.
        previous: The previous good model (rollback target), if any.
        highest: Highest version ever installed, per model name.
        floor: Highest version ever installed under any name (the slot floor).
    """

    current: InstalledModel | None = None
    previous: InstalledModel | None = None
    highest: tuple[tuple[str, int], ...] = ()
    floor: int = 0

    def highest_version(self, name: str) -> int | None:
        """Highest version ever installed for ``name`` (None if never)."""
        return dict(self.highest).get(name)

    def slot_floor(self) -> int:
        """The version a model under another name must exceed to replace the serving one:
        the highest installed under any name, and at least the current model's."""
        return max(self.floor, self.current.version if self.current is not None else 0)

    def with_highest(self, name: str, version: int) -> StoreState:
        """A copy with ``name``'s counter and the slot floor raised to at least ``version``."""
        counters = dict(self.highest)
        counters[name] = max(version, counters.get(name, version))
        return replace(
            self, highest=tuple(sorted(counters.items())), floor=max(self.floor, version)
        )

    def to_bytes(self) -> bytes:
        """Serialized form."""
        obj = {
            "schema": STATE_SCHEMA,
            "current": self.current.to_json() if self.current else None,
            "previous": self.previous.to_json() if self.previous else None,
            "highest": dict(self.highest),
            "floor": self.floor,
        }
        return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> StoreState:
        """Parse state.json.

        Raises:
            StateError: invalid JSON, a newer schema, or bad fields.
        """
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StateError(f"{STATE_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("schema") != STATE_SCHEMA:
            raise StateError(f"{STATE_FILE} has an unknown schema")
        highest = obj.get("highest")
        if not isinstance(highest, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in highest.items()
        ):
            raise StateError(f"{STATE_FILE}: bad 'highest' counters")
        floor = obj.get("floor", 0)
        if type(floor) is not int or floor < 0:
            raise StateError(f"{STATE_FILE}: bad slot 'floor'")
        current, previous = obj.get("current"), obj.get("previous")
        return cls(
            current=InstalledModel.from_json(current) if current is not None else None,
            previous=InstalledModel.from_json(previous) if previous is not None else None,
            highest=tuple(sorted(highest.items())),
            floor=floor,
        )


class ModelStore:
    """Slots and state of one data directory. Not thread-safe (one worker uses it)."""

    def __init__(self, data_dir: Path) -> None:
        """Open (creating if needed) the store under ``data_dir``.

        Raises:
            StateError: the directory cannot be created or state.json is unusable.
        """
        self.root = data_dir
        try:
            for slot in SLOTS:
                (data_dir / "slots" / slot).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create {data_dir}/slots: {exc}") from exc
        self._state = self._load()

    @property
    def state(self) -> StoreState:
        """The committed state."""
        return self._state

    def _load(self) -> StoreState:
        path = self.root / STATE_FILE
        if not path.exists():
            return StoreState()
        data = read_bounded(path, max_bytes=_MAX_STATE_BYTES, error=StateError, what="agent state")
        return StoreState.from_bytes(data)

    def commit(self, state: StoreState) -> None:
        """Atomically replace state.json.

        Raises:
            StateError: the write failed (the previous state stays in force).
        """
        write_state_file(self.root / STATE_FILE, state.to_bytes(), verb="write")
        self._state = state

    def slot_dir(self, slot: str) -> Path:
        """The directory of a slot."""
        return self.root / "slots" / slot

    def free_slot(self) -> str:
        """The slot an install may overwrite (never the current one)."""
        current = self._state.current
        return SLOTS[1] if current is not None and current.slot == SLOTS[0] else SLOTS[0]

    def prepare_slot(self) -> str:
        """Empty the free slot for a new install and return its name.

        If the free slot holds the rollback target, the state first stops naming it
        (committed), so no crash can leave the state pointing at a half-written slot.

        Raises:
            StateError: the state or the slot cannot be written.
        """
        slot = self.free_slot()
        previous = self._state.previous
        if previous is not None and previous.slot == slot:
            self.commit(replace(self._state, previous=None))
        directory = self.slot_dir(slot)
        try:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot empty slot {directory}: {exc}") from exc
        return slot

    def fill_slot(self, slot: str, payload: Path, manifest_blob: bytes) -> None:
        """Move a verified payload file into a prepared slot, with its manifest.

        Raises:
            StateError: the move or write failed.
        """
        directory = self.slot_dir(slot)
        try:
            atomic_write(directory / MANIFEST_FILE, manifest_blob, mode=0o600)
            os.replace(payload, directory / PAYLOAD_FILE)
            fsync_directory(directory)
        except OSError as exc:
            raise StateError(f"cannot fill slot {directory}: {exc}") from exc

    def read_payload(self, model: InstalledModel) -> bytes:
        """Read a slot's payload and check it against the recorded sha256.

        Raises:
            StateError: the file is missing, unreadable or does not match.
        """
        data = self.read_slot_payload(model.slot)
        if hashlib.sha256(data).hexdigest() != model.sha256:
            raise StateError(
                f"{self.slot_dir(model.slot) / PAYLOAD_FILE} does not match the sha256 "
                "recorded at install"
            )
        return data

    def read_slot_payload(self, slot: str) -> bytes:
        """A slot's payload bytes as they are on disk, unchecked (at most the largest
        payload a manifest may declare); the caller checks them against the manifest.

        Raises:
            StateError: the file is missing, unreadable or too large.
        """
        path = self.slot_dir(slot) / PAYLOAD_FILE
        return read_bounded(path, max_bytes=MAX_PAYLOAD_BYTES, error=StateError, what="model")

    def read_manifest_blob(self, slot: str) -> bytes:
        """The signed manifest stored with a slot.

        Raises:
            StateError: missing or unreadable.
        """
        path = self.slot_dir(slot) / MANIFEST_FILE
        return read_bounded(path, max_bytes=MAX_BLOB_BYTES, error=StateError, what="manifest")

    def discard_slot(self, slot: str) -> None:
        """Empty a slot that is neither current nor previous (best effort)."""
        state = self._state
        if any(m is not None and m.slot == slot for m in (state.current, state.previous)):
            return
        with contextlib.suppress(OSError):
            shutil.rmtree(self.slot_dir(slot))
            self.slot_dir(slot).mkdir(parents=True, exist_ok=True, mode=0o700)
