"""Tests for edge_agent.ota.installer: trust rules before download, A/B install after."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.errors import (
    CompressError,
    ExpiredError,
    IncompatibleDeviceError,
    NoStatementError,
    NotTargetedError,
    PayloadHashError,
    PayloadLengthError,
    RollbackError,
    SlotRollbackError,
    StaleStatementError,
    ThresholdError,
    UnknownKeyError,
)
from compress.keys import SigningKey, generate_signing_key
from compress.manifest import Manifest
from compress.signing import SignedManifest, TrustedKeys, sign_manifest
from compress.statement import FleetStatement, Target, sign_statement
from compress.trust import DeviceProfile
from edge_agent.errors import HealthCheckError, ModelRuntimeError, TransferError
from edge_agent.ota.fleet_guard import FleetGuard
from edge_agent.ota.installer import AlreadyInstalled, check_deploy, install
from edge_agent.ota.model_store import InstalledModel, ModelStore, StoreState
from edge_agent.ota.staging import StagedTransfer, TransferInfo
from edge_agent.protocol import Chunk, Deploy, FleetStatementMessage, chunk_count
from edge_agent.runtime.base import ModelRuntime
from tests.conftest import NOW, PAYLOAD, make_manifest
from tests.fleet_support import CLASSES, FEATURES
from tests.ota_support import signed_artifacts

CHUNK = 1024
CHECKPOINTS = ["payload-verified", "slot-written", "model-loaded", "health-checked", "committed"]

Artifact = tuple[SignedManifest, bytes]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deploy_of(signed: SignedManifest, payload: bytes, **changes: Any) -> Deploy:
    fields: dict[str, Any] = {
        "deployment_id": "dep-1",
        "transfer_id": sha(payload),
        "total_size": len(payload),
        "chunk_size": CHUNK,
        "chunk_count": chunk_count(len(payload), CHUNK),
        "manifest": signed.to_bytes(),
    }
    fields.update(changes)
    return Deploy(**fields)


def installed(manifest: Manifest, slot: str = "a") -> InstalledModel:
    return InstalledModel(
        slot=slot,
        name=manifest.name,
        version=manifest.version,
        sha256=manifest.sha256,
        format=manifest.format,
        installed_at=1.0,
    )


def stage(root: Path, artifact: Artifact, data: bytes | None = None) -> StagedTransfer:
    """A complete staged transfer of ``artifact``'s payload (or of other ``data``)."""
    signed, payload = artifact
    info = TransferInfo(
        deployment_id="dep-1",
        transfer_id=sha(payload),
        total_size=len(payload),
        chunk_size=CHUNK,
        chunk_count=chunk_count(len(payload), CHUNK),
    )
    transfer = StagedTransfer.create(root, info, signed.to_bytes())
    body = payload if data is None else data
    for index in range(info.chunk_count):
        transfer.write(
            Chunk.from_payload(body, index, chunk_size=CHUNK, transfer_id=info.transfer_id)
        )
    assert transfer.complete
    return transfer


@pytest.fixture(scope="module")
def key(signing_keys: list[SigningKey]) -> SigningKey:
    return signing_keys[0]


@pytest.fixture(scope="module")
def trusted(key: SigningKey) -> TrustedKeys:
    return TrustedKeys.of([key.public_key])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> dict[str, Artifact]:
    directory = tmp_path_factory.mktemp("artifacts")
    return signed_artifacts(
        directory,
        key,
        {
            "v1": {"version": 1, "seed": 1},
            "v2": {"version": 2, "seed": 2},
            "v3-bad": {"version": 3, "seed": 3, "break_health_check": True},
            "v2-bad": {"version": 2, "seed": 2, "break_health_check": True},
        },
    )


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "data")


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return tmp_path / "data" / "staging"


class Installer:
    """check_deploy + stage + install, as the agent chains them."""

    def __init__(self, store: ModelStore, staging: Path, trusted: TrustedKeys) -> None:
        self.store = store
        self.staging = staging
        self.trusted = trusted
        self.checkpoints: list[str] = []

    def manifest(self, artifact: Artifact) -> Manifest:
        signed, payload = artifact
        return check_deploy(
            deploy_of(signed, payload),
            trusted=self.trusted,
            device=DeviceProfile(),
            store=self.store,
            now=datetime.now(UTC),
        )

    def __call__(
        self, artifact: Artifact, data: bytes | None = None
    ) -> tuple[InstalledModel, ModelRuntime]:
        manifest = self.manifest(artifact)
        transfer = stage(self.staging, artifact, data)
        try:
            return install(
                transfer,
                manifest,
                store=self.store,
                installed_at=1_800_000_000.0,
                checkpoint=self.checkpoints.append,
            )
        finally:
            transfer.discard()


@pytest.fixture
def installer(store: ModelStore, staging: Path, trusted: TrustedKeys) -> Installer:
    return Installer(store, staging, trusted)


def state_file(store: ModelStore) -> bytes | None:
    path = store.root / "state.json"
    return path.read_bytes() if path.exists() else None


def slot_files(store: ModelStore, slot: str) -> list[str]:
    return sorted(p.name for p in store.slot_dir(slot).iterdir())


# ----------------------------------------------------------------- check_deploy


def check(
    signed: SignedManifest,
    store: ModelStore,
    trusted: TrustedKeys,
    *,
    payload: bytes = PAYLOAD,
    device: DeviceProfile | None = None,
    **changes: Any,
) -> Manifest:
    return check_deploy(
        deploy_of(signed, payload, **changes),
        trusted=trusted,
        device=device or DeviceProfile(),
        store=store,
        now=NOW,
    )


def test_check_deploy_accepts_a_good_deploy(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    manifest = make_manifest()
    assert check(sign_manifest(manifest, [key]), store, trusted) == manifest
    assert state_file(store) is None  # deciding writes nothing


def test_check_deploy_accepts_a_version_above_the_highest(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    store.commit(StoreState().with_highest("digits", 3))
    manifest = make_manifest(version=4)
    assert check(sign_manifest(manifest, [key]), store, trusted) == manifest


def test_check_deploy_rejects_an_untrusted_key(store: ModelStore, trusted: TrustedKeys) -> None:
    signed = sign_manifest(make_manifest(), [generate_signing_key()])
    with pytest.raises(UnknownKeyError) as caught:
        check(signed, store, trusted)
    assert caught.value.code == "unknown_key"


def test_check_deploy_rejects_too_few_signatures(
    store: ModelStore, signing_keys: list[SigningKey]
) -> None:
    trusted = TrustedKeys.of([k.public_key for k in signing_keys], threshold=2)
    with pytest.raises(ThresholdError):
        check(sign_manifest(make_manifest(), signing_keys[:1]), store, trusted)
    signed = sign_manifest(make_manifest(), signing_keys[:2])
    assert check(signed, store, trusted) == make_manifest()


def test_check_deploy_rejects_an_expired_manifest(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    manifest = make_manifest(created=NOW - timedelta(days=10), expires=NOW - timedelta(seconds=1))
    with pytest.raises(ExpiredError) as caught:
        check(sign_manifest(manifest, [key]), store, trusted)
    assert caught.value.code == "expired"


@pytest.mark.parametrize("version", [1, 3])
def test_check_deploy_rejects_a_version_not_above_the_highest(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey, version: int
) -> None:
    store.commit(StoreState().with_highest("digits", 3))
    with pytest.raises(RollbackError) as caught:
        check(sign_manifest(make_manifest(version=version), [key]), store, trusted)
    assert caught.value.code == "rollback"


def test_check_deploy_counts_per_model_name(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    store.commit(StoreState().with_highest("other-model", 9))
    manifest = make_manifest(version=1)
    assert check(sign_manifest(manifest, [key]), store, trusted) == manifest


def test_check_deploy_keeps_a_floor_per_slot_too(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    """The issue's attack: an old, unexpired manifest signed for another name
    (``digits-canary`` v1) used to replace the serving ``digits`` v5, since the rollback
    counter was per name only. Without a fleet, another name must beat the slot floor."""
    serving = installed(make_manifest(version=5))
    store.commit(StoreState(current=serving).with_highest("digits", 5))
    canary = make_manifest(name="digits-canary", version=1)
    with pytest.raises(SlotRollbackError, match="slot floor v5") as caught:
        check(sign_manifest(canary, [key]), store, trusted)
    assert caught.value.code == "slot_rollback"
    assert isinstance(caught.value, RollbackError)

    # The floor is the highest ever installed: after a rollback to v4 it stays 5.
    store.commit(StoreState(current=installed(make_manifest(version=4)), floor=5))
    with pytest.raises(SlotRollbackError):
        check(sign_manifest(make_manifest(name="digits-canary", version=5), [key]), store, trusted)
    # Normal operation: a newer version of the serving model, or another model above the
    # floor, still installs.
    newer = make_manifest(name="digits-canary", version=6)
    assert check(sign_manifest(newer, [key]), store, trusted) == newer
    assert check(sign_manifest(make_manifest(version=5), [key]), store, trusted).version == 5


def test_with_a_fleet_only_the_fresh_statement_decides(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey, tmp_path: Path
) -> None:
    """With a fleet configured, the statement must name name, version and sha256; it may
    name another model below the slot floor (the coordinator's word on what runs)."""
    store.commit(StoreState(current=installed(make_manifest(version=5))).with_highest("digits", 5))
    canary = make_manifest(name="digits-canary", version=1)
    clock = [NOW.timestamp()]
    guard = FleetGuard("plant-a", tmp_path, trusted=trusted, clock=lambda: clock[0])

    def deploy(manifest: Manifest) -> Manifest:
        return check_deploy(
            deploy_of(sign_manifest(manifest, [key]), PAYLOAD),
            trusted=trusted,
            device=DeviceProfile(),
            store=store,
            now=datetime.fromtimestamp(clock[0], UTC),
            targeting=guard.require_targeted,
        )

    with pytest.raises(NoStatementError) as none:
        deploy(canary)
    assert none.value.code == "no_statement"
    statement = FleetStatement(
        fleet="plant-a",
        version=1,
        issued=NOW,
        expires=NOW + timedelta(hours=1),
        targets={"digits": Target(6, canary.sha256)},
    )
    assert guard.on_statement(
        FleetStatementMessage(statement=sign_statement(statement, [key]).to_bytes())
    )
    with pytest.raises(NotTargetedError) as other:
        deploy(canary)
    assert other.value.code == "not_targeted"
    assert deploy(make_manifest(version=6)).version == 6  # normal operation

    named = replace(statement, version=2, targets={"digits-canary": Target(1, canary.sha256)})
    assert guard.on_statement(
        FleetStatementMessage(statement=sign_statement(named, [key]).to_bytes())
    )
    assert deploy(canary) == canary
    clock[0] += 3600
    with pytest.raises(StaleStatementError) as stale:
        deploy(canary)
    assert stale.value.code == "stale_statement"


def test_check_deploy_of_the_current_model_is_already_installed(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    manifest = make_manifest()
    current = installed(manifest)
    store.commit(StoreState(current=current).with_highest("digits", manifest.version))
    with pytest.raises(AlreadyInstalled) as caught:
        check(sign_manifest(manifest, [key]), store, trusted)
    assert caught.value.model == current
    assert "digits v3 is already installed" in str(caught.value)


def test_check_deploy_of_the_current_model_after_a_rollback_is_already_installed(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    manifest = make_manifest(version=3)
    store.commit(StoreState(current=installed(manifest)).with_highest("digits", 5))
    with pytest.raises(AlreadyInstalled):
        check(sign_manifest(manifest, [key]), store, trusted)


@pytest.mark.parametrize(
    "current",
    [
        pytest.param(replace(installed(make_manifest()), sha256="0" * 64), id="other-sha256"),
        pytest.param(replace(installed(make_manifest()), version=2), id="other-version"),
        pytest.param(replace(installed(make_manifest()), name="other"), id="other-name"),
        pytest.param(None, id="no-current"),
    ],
)
def test_check_deploy_of_anything_else_at_the_same_version_is_a_rollback(
    store: ModelStore,
    trusted: TrustedKeys,
    key: SigningKey,
    current: InstalledModel | None,
) -> None:
    store.commit(StoreState(current=current).with_highest("digits", 3))
    with pytest.raises(RollbackError):
        check(sign_manifest(make_manifest(), [key]), store, trusted)


def test_check_deploy_of_the_previous_model_is_a_rollback(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    old, new = make_manifest(version=2), make_manifest(version=3, sha256="1" * 64)
    store.commit(
        StoreState(current=installed(new, "b"), previous=installed(old, "a")).with_highest(
            "digits", 3
        )
    )
    with pytest.raises(RollbackError):
        check(sign_manifest(old, [key]), store, trusted)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"transfer_id": sha(b"another payload")}, id="transfer-id"),
        pytest.param(
            {"total_size": len(PAYLOAD) + 1, "chunk_count": chunk_count(len(PAYLOAD) + 1, CHUNK)},
            id="total-size",
        ),
    ],
)
def test_check_deploy_rejects_transfer_fields_that_contradict_the_manifest(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey, changes: dict[str, Any]
) -> None:
    with pytest.raises(TransferError, match="not the payload the manifest signs") as caught:
        check(sign_manifest(make_manifest(), [key]), store, trusted, **changes)
    assert caught.value.code == "transfer_error"


@pytest.mark.parametrize(
    ("device", "manifest"),
    [
        pytest.param(DeviceProfile(runtimes=frozenset()), make_manifest(), id="no-runtime"),
        pytest.param(
            DeviceProfile(runtimes=frozenset({"tflite"})), make_manifest(), id="other-runtime"
        ),
        pytest.param(
            DeviceProfile(hardware_tags=frozenset({"arm64"})),
            make_manifest(hardware_tags=("arm64", "npu")),
            id="hardware-tag",
        ),
    ],
)
def test_check_deploy_rejects_a_device_that_cannot_run_the_model(
    store: ModelStore,
    trusted: TrustedKeys,
    key: SigningKey,
    device: DeviceProfile,
    manifest: Manifest,
) -> None:
    with pytest.raises(IncompatibleDeviceError) as caught:
        check(sign_manifest(manifest, [key]), store, trusted, device=device)
    assert caught.value.code == "incompatible_device"


def test_check_deploy_rejects_a_manifest_blob_that_is_not_one(
    store: ModelStore, trusted: TrustedKeys, key: SigningKey
) -> None:
    deploy = replace(deploy_of(sign_manifest(make_manifest(), [key]), PAYLOAD), manifest=b"junk")
    with pytest.raises(CompressError):
        check_deploy(deploy, trusted=trusted, device=DeviceProfile(), store=store, now=NOW)


# ---------------------------------------------------------------------- install


def test_install_commits_the_first_model(
    installer: Installer, store: ModelStore, artifacts: dict[str, Artifact]
) -> None:
    signed, payload = artifacts["v1"]
    model, runtime = installer(artifacts["v1"])

    assert model == InstalledModel(
        slot="a",
        name="digits",
        version=1,
        sha256=sha(payload),
        format="onnx",
        installed_at=1_800_000_000.0,
    )
    assert store.state == StoreState(
        current=model, previous=None, highest=(("digits", 1),), floor=1
    )
    assert ModelStore(store.root).state == store.state
    assert store.read_payload(model) == payload
    assert store.read_manifest_blob("a") == signed.to_bytes()
    assert runtime.predict(np.zeros((2, FEATURES), dtype=np.float32)).shape == (2, CLASSES)


def test_install_moves_the_staged_payload_into_the_slot(
    store: ModelStore, staging: Path, artifacts: dict[str, Artifact], trusted: TrustedKeys
) -> None:
    installer = Installer(store, staging, trusted)
    manifest = installer.manifest(artifacts["v1"])
    transfer = stage(staging, artifacts["v1"])
    try:
        install(transfer, manifest, store=store, installed_at=0.0)
        assert not transfer.payload_path().exists()
    finally:
        transfer.discard()


def test_a_second_install_uses_the_other_slot_and_keeps_the_previous(
    installer: Installer, store: ModelStore, artifacts: dict[str, Artifact]
) -> None:
    first, _ = installer(artifacts["v1"])
    second, _ = installer(artifacts["v2"])

    assert (first.slot, second.slot) == ("a", "b")
    expected = StoreState(current=second, previous=first, highest=(("digits", 2),), floor=2)
    assert store.state == expected
    assert ModelStore(store.root).state == expected
    assert store.read_payload(first) == artifacts["v1"][1]
    assert store.read_payload(second) == artifacts["v2"][1]


def test_install_refuses_a_payload_that_does_not_match_the_manifest(
    installer: Installer, store: ModelStore, artifacts: dict[str, Artifact]
) -> None:
    good, _ = installer(artifacts["v1"])
    before, before_file = store.state, state_file(store)
    payload = artifacts["v2"][1]
    tampered = payload[:-1] + bytes([payload[-1] ^ 0xFF])
    installer.checkpoints.clear()

    with pytest.raises(PayloadHashError):
        installer(artifacts["v2"], data=tampered)
    assert installer.checkpoints == []
    assert store.state == before
    assert state_file(store) == before_file
    assert slot_files(store, "b") == []
    assert store.read_payload(good) == artifacts["v1"][1]


def test_install_refuses_a_payload_longer_than_the_manifest(
    store: ModelStore, staging: Path, artifacts: dict[str, Artifact], trusted: TrustedKeys
) -> None:
    manifest = Installer(store, staging, trusted).manifest(artifacts["v1"])
    transfer = stage(staging, artifacts["v1"])
    try:
        with transfer.payload_path().open("ab") as payload:
            payload.write(b"\x00")
        with pytest.raises(PayloadLengthError):
            install(transfer, manifest, store=store, installed_at=0.0)
    finally:
        transfer.discard()
    assert store.state == StoreState()
    assert state_file(store) is None


def test_a_failed_health_check_keeps_the_current_model(
    installer: Installer, store: ModelStore, artifacts: dict[str, Artifact]
) -> None:
    good, _ = installer(artifacts["v1"])
    before, before_file = store.state, state_file(store)
    installer.checkpoints.clear()

    with pytest.raises(HealthCheckError):
        installer(artifacts["v2-bad"])
    assert installer.checkpoints == CHECKPOINTS[:3]
    assert store.state == before
    assert state_file(store) == before_file
    assert ModelStore(store.root).state == before
    assert store.state.highest_version("digits") == 1
    assert store.slot_dir("b").is_dir()
    assert slot_files(store, "b") == []
    assert store.read_payload(good) == artifacts["v1"][1]
    # the version was not burnt: a good v2 still installs
    assert installer(artifacts["v2"])[0].version == 2


def test_a_failed_first_install_leaves_an_empty_store(
    installer: Installer, store: ModelStore, artifacts: dict[str, Artifact]
) -> None:
    with pytest.raises(HealthCheckError):
        installer(artifacts["v2-bad"])
    assert store.state == StoreState()
    assert state_file(store) is None
    assert slot_files(store, "a") == []


def test_a_failed_install_into_the_previous_slot_keeps_current_and_counters(
    installer: Installer, store: ModelStore, artifacts: dict[str, Artifact]
) -> None:
    installer(artifacts["v1"])
    current, _ = installer(artifacts["v2"])

    with pytest.raises(HealthCheckError):
        installer(artifacts["v3-bad"])
    # slot a held the rollback target; it had to be given up to try v3 there
    expected = StoreState(current=current, previous=None, highest=(("digits", 2),), floor=2)
    assert store.state == expected
    assert ModelStore(store.root).state == expected
    assert slot_files(store, "a") == []
    assert store.read_payload(current) == artifacts["v2"][1]


def test_a_model_the_runtime_cannot_load_is_not_installed(
    store: ModelStore, staging: Path, key: SigningKey
) -> None:
    payload = b"this is not an onnx model"
    manifest = make_manifest(payload)
    transfer = stage(staging, (sign_manifest(manifest, [key]), payload))
    steps: list[str] = []
    try:
        with pytest.raises(ModelRuntimeError):
            install(transfer, manifest, store=store, installed_at=0.0, checkpoint=steps.append)
    finally:
        transfer.discard()
    assert steps == CHECKPOINTS[:2]
    assert store.state == StoreState()
    assert slot_files(store, "a") == []


def test_install_calls_the_checkpoints_in_order(
    installer: Installer, artifacts: dict[str, Artifact]
) -> None:
    installer(artifacts["v1"])
    assert installer.checkpoints == CHECKPOINTS


class CrashError(Exception):
    """Stands in for a SIGKILL at a checkpoint."""


@pytest.mark.parametrize("at", CHECKPOINTS)
def test_a_crash_at_any_checkpoint_leaves_old_or_new_state(
    store: ModelStore,
    staging: Path,
    trusted: TrustedKeys,
    artifacts: dict[str, Artifact],
    at: str,
) -> None:
    installer = Installer(store, staging, trusted)
    old, _ = installer(artifacts["v1"])
    manifest = installer.manifest(artifacts["v2"])
    transfer = stage(staging, artifacts["v2"])

    def checkpoint(name: str) -> None:
        if name == at:
            raise CrashError(name)

    try:
        with pytest.raises(CrashError):
            install(transfer, manifest, store=store, installed_at=2.0, checkpoint=checkpoint)
    finally:
        transfer.close()

    after = ModelStore(store.root)  # what a restarted agent sees
    assert after.state.current is not None
    if at == "committed":
        assert after.state.current.version == 2
        assert after.state.previous == old
        assert after.state.highest_version("digits") == 2
    else:
        assert after.state.current == old
        assert after.state.highest_version("digits") == 1
    assert (
        after.read_payload(after.state.current) == artifacts[f"v{after.state.current.version}"][1]
    )


def test_a_model_without_a_health_check_installs_with_a_warning(
    store: ModelStore,
    staging: Path,
    key: SigningKey,
    artifacts: dict[str, Artifact],
    caplog: pytest.LogCaptureFixture,
) -> None:
    signed, payload = artifacts["v1"]
    manifest = replace(signed.manifest, health_check=None)
    transfer = stage(staging, (sign_manifest(manifest, [key]), payload))
    steps: list[str] = []
    try:
        with caplog.at_level(logging.WARNING, logger="edge_agent.ota.installer"):
            model, _ = install(
                transfer, manifest, store=store, installed_at=0.0, checkpoint=steps.append
            )
    finally:
        transfer.discard()
    assert steps == CHECKPOINTS
    assert store.state.current == model
    assert "has no health check" in caplog.text
