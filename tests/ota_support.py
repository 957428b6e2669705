"""Putting models into an agent's data directory for start-up re-verification tests.

:func:`place_model` installs a signed artifact the way the installer leaves it (the
payload and its signed manifest in the free slot, then ``state.json`` names it
current and the old current previous), without a health check or a runtime, so
tests can then plant, tamper or forge files and start an agent on the directory.
:func:`plant_model` is the attack: a payload and a hand-written ``state.json``
pointing at it, with no signed manifest at all. :func:`signed_artifacts` makes the
signed artifacts a test module installs (one per named variant).
:func:`make_updater` builds an :class:`~edge_agent.ota.updates.Updater` on a data
directory as the agent does, on an in-memory link.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from compress.artifact import read_artifact_unverified
from compress.keys import SigningKey
from compress.signing import SignedManifest
from compress.trust import DeviceProfile
from edge_agent.config.sections import TransferConfig
from edge_agent.ota.fleet_guard import TrustSource
from edge_agent.ota.installer import Targeting
from edge_agent.ota.model_store import MANIFEST_FILE, PAYLOAD_FILE, InstalledModel, ModelStore
from edge_agent.ota.updates import Reporter, Updater
from edge_agent.serving.server import ModelServer
from edge_agent.transport.memory import MemoryBroker, MemoryLink
from tests.fleet_support import make_artifact

Artifact = tuple[SignedManifest, bytes]


def signed_artifacts(
    directory: Path, key: SigningKey, variants: Mapping[str, Mapping[str, Any]]
) -> dict[str, Artifact]:
    """One artifact per ``variants`` entry (name -> ``make_artifact`` options), signed by
    ``key``, written under ``directory`` and read back unverified."""
    return {
        name: read_artifact_unverified(make_artifact(directory, key, **options))
        for name, options in variants.items()
    }


def place_model(data_dir: Path, artifact: Artifact, *, installed_at: float = 1.0) -> InstalledModel:
    """Install ``artifact`` into ``data_dir`` as the current model; return its record."""
    signed, payload = artifact
    manifest = signed.manifest
    store = ModelStore(data_dir)
    slot = store.prepare_slot()
    incoming = data_dir / "incoming.payload"
    incoming.write_bytes(payload)
    store.fill_slot(slot, incoming, signed.to_bytes())
    model = InstalledModel(
        slot=slot,
        name=manifest.name,
        version=manifest.version,
        sha256=manifest.sha256,
        format=manifest.format,
        installed_at=installed_at,
    )
    state = store.state
    store.commit(
        replace(state, current=model, previous=state.current).with_highest(
            manifest.name, manifest.version
        )
    )
    return model


def plant_model(data_dir: Path, payload: bytes, *, name: str = "digits", version: int = 9) -> None:
    """Write ``payload`` into slot ``a`` and a forged ``state.json`` naming it current."""
    slot = data_dir / "slots" / "a"
    slot.mkdir(parents=True, exist_ok=True)
    (slot / PAYLOAD_FILE).write_bytes(payload)
    (slot / MANIFEST_FILE).unlink(missing_ok=True)
    record = {
        "slot": "a",
        "name": name,
        "version": version,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "format": "onnx",
        "installed_at": 1.0,
    }
    state = {"schema": 1, "current": record, "previous": None, "highest": {name: version}}
    (data_dir / "state.json").write_text(json.dumps(state))


def flip_byte(data_dir: Path, slot: str, offset: int = -1) -> None:
    """Flip one byte of a slot's payload (the last one by default)."""
    path = data_dir / "slots" / slot / PAYLOAD_FILE
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def make_updater(
    data_dir: Path,
    *,
    trusted: TrustSource,
    reporter: Reporter,
    server: ModelServer | None = None,
    clock: Callable[[], float] = time.time,
    targeting: Targeting | None = None,
) -> Updater:
    """An updater on ``data_dir`` (its models and staging area) as the agent builds it,
    speaking over an in-memory link; the caller closes it."""
    link = MemoryLink(MemoryBroker(), client_id="dev", subscriptions=[], on_message=lambda *_: None)
    return Updater(
        store=ModelStore(data_dir),
        staging_root=data_dir / "staging",
        trusted=trusted,
        device=DeviceProfile(),
        server=server or ModelServer(),
        link=link,
        reporter=reporter,
        config=TransferConfig(),
        clock=clock,
        checkpoint=lambda _step: None,
        targeting=targeting,
    )
