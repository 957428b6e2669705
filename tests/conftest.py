"""Shared fixtures: signing keys, a fixed clock, manifest/artifact factories, a clean
environment for the operator commands, a real mosquitto and in-process agents.

``broker`` is THE mosquitto of the suite (tests/fleet_support.py's ``running_broker``:
a :class:`Mosquitto` with the shipped ACL); it knows the MQTT users a module names by
overriding ``broker_users``. ``module_broker`` is the same broker for a whole module
(users: ``module_broker_users``), for module-scoped fleets. ``fleet`` starts
in-process agents on ``broker`` that trust ``signing_key``. Waiting is
tests/fleet_support.py's ``wait_for``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.artifact import write_artifact
from compress.keys import SigningKey, generate_signing_key
from compress.manifest import HealthCheck, Manifest, ReferenceTensor, TensorSpec
from compress.signing import SignedManifest, sign_manifest
from edge_agent.training.numpy_trainers import register_trainer, unregister_trainer
from tests.fleet_support import InProcessFleet, Mosquitto, public_key_file, running_broker
from tests.training_support import GATED_FAMILY, Gate

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)

FEDGE_VARS = ("FEDGE_API", "FEDGE_TOKEN", "FEDGE_BROKER", "FEDGE_BROKER_PASSWORD", "FEDGE_DB")
"""The environment variables the operator commands read."""


@pytest.fixture
def clean_fedge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: none of the caller's FEDGE_* variables; wide tables."""
    for name in FEDGE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def gate() -> Iterator[Gate]:
    """A :class:`~tests.training_support.Gate` registered as the trainer family ``gated``."""
    instance = Gate()
    register_trainer(GATED_FAMILY, instance.trainer)
    try:
        yield instance
    finally:
        instance.release.set()
        unregister_trainer(GATED_FAMILY)


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """torch computes on one thread during the test (the cores are shared); restored after.

    torch is imported here, not at the top: most tests never load it.
    """
    import torch  # noqa: PLC0415 - only for the tests that use torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def now() -> datetime:
    """A fixed 'current time' for pure trust checks."""
    return NOW


@pytest.fixture(scope="session")
def signing_keys() -> list[SigningKey]:
    """Three distinct Ed25519 keys (for k-of-n tests)."""
    return [generate_signing_key() for _ in range(3)]


@pytest.fixture
def signing_key(signing_keys: list[SigningKey]) -> SigningKey:
    """One signing key."""
    return signing_keys[0]


PAYLOAD = bytes(range(256)) * 40


def make_manifest(payload: bytes = PAYLOAD, **overrides: Any) -> Manifest:
    """A valid manifest describing ``payload``; keyword arguments replace fields."""
    fields: dict[str, Any] = {
        "name": "digits",
        "version": 3,
        "format": "onnx",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "length": len(payload),
        "inputs": (TensorSpec("input", (None, 64)),),
        "outputs": (TensorSpec("probabilities", (None, 10)),),
        "quantization": "int8-dynamic",
        "created": NOW - timedelta(days=1),
        "expires": NOW + timedelta(days=30),
        "health_check": HealthCheck(
            inputs={
                "input": ReferenceTensor.from_array(
                    np.linspace(0, 1, 128, dtype=np.float32).reshape(2, 64)
                )
            },
            outputs={
                "probabilities": ReferenceTensor.from_array(np.full((2, 10), 0.1, dtype=np.float32))
            },
        ),
        "metadata": {"family": "mlp"},
    }
    fields.update(overrides)
    return Manifest(**fields)


@pytest.fixture
def manifest() -> Manifest:
    """A valid manifest of :data:`PAYLOAD`."""
    return make_manifest()


@pytest.fixture
def signed(manifest: Manifest, signing_key: SigningKey) -> SignedManifest:
    """The manifest signed by one key."""
    return sign_manifest(manifest, [signing_key])


ArtifactFactory = Callable[..., Path]


@pytest.fixture
def artifact_file(tmp_path: Path, signing_key: SigningKey) -> ArtifactFactory:
    """Write a signed artifact file; keyword arguments go to :func:`make_manifest`."""

    def factory(
        payload: bytes = PAYLOAD, keys: list[SigningKey] | None = None, **overrides: Any
    ) -> Path:
        manifest = make_manifest(payload, **overrides)
        path = tmp_path / f"{manifest.name}-v{manifest.version}.fedge"
        write_artifact(path, sign_manifest(manifest, keys or [signing_key]), payload)
        return path

    return factory


@pytest.fixture
def broker_users() -> Sequence[str]:
    """The MQTT users (besides ``coordinator``) the ``broker`` knows; modules override it."""
    return ()


@pytest.fixture
def broker(tmp_path: Path, broker_users: Sequence[str]) -> Iterator[Mosquitto]:
    """A running mosquitto with the shipped ACL, stopped after the test."""
    with running_broker(tmp_path, broker_users) as instance:
        yield instance


@pytest.fixture(scope="module")
def module_broker_users() -> Sequence[str]:
    """The MQTT users the ``module_broker`` knows; modules override it."""
    return ()


@pytest.fixture(scope="module")
def module_broker(
    tmp_path_factory: pytest.TempPathFactory, module_broker_users: Sequence[str]
) -> Iterator[Mosquitto]:
    """The ``broker``, started once for a module (for module-scoped fleets)."""
    with running_broker(tmp_path_factory.mktemp("module"), module_broker_users) as instance:
        yield instance


@pytest.fixture
def fleet(tmp_path: Path, broker: Mosquitto, signing_key: SigningKey) -> Iterator[InProcessFleet]:
    """In-process agents on ``broker`` trusting ``signing_key`` (none started yet)."""
    trust = public_key_file(tmp_path / "fleet-keys", signing_key)
    instance = InProcessFleet(broker, tmp_path / "agents", trust)
    try:
        yield instance
    finally:
        instance.stop()
