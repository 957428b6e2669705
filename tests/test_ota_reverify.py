"""Tests for edge_agent.ota.reverify and the updater's start-up check: an installed
model is served only if it still verifies against its signed manifest."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from compress.keys import SigningKey, generate_signing_key
from compress.manifest import Manifest
from compress.signing import TrustedKeys, sign_manifest
from edge_agent.errors import UntrustedModelError
from edge_agent.ota.model_store import MANIFEST_FILE, PAYLOAD_FILE, InstalledModel, ModelStore
from edge_agent.ota.reverify import verify_installed
from edge_agent.ota.updates import STARTUP_CHECK, Updater
from edge_agent.protocol import ChunkRequest, InstallState, Rollback
from edge_agent.serving.server import ModelServer
from tests.clock_support import ManualClock
from tests.ota_support import (
    Artifact,
    flip_byte,
    make_updater,
    place_model,
    plant_model,
    signed_artifacts,
)


@dataclass
class Reports:
    """A Reporter that keeps what it was told."""

    sent: list[tuple[str, InstallState, tuple[str, int] | None, dict[str, Any]]] = field(
        default_factory=list
    )

    def report(
        self,
        deployment_id: str,
        state: InstallState,
        model: InstalledModel | Manifest | None,
        **details: Any,
    ) -> None:
        named = (model.name, model.version) if model is not None else None
        self.sent.append((deployment_id, state, named, details))

    def request_chunks(self, request: ChunkRequest) -> bool:
        del request
        return False

    def announce(self) -> None:
        return None

    def startup(self) -> list[tuple[InstallState, tuple[str, int] | None, str | None]]:
        return [
            (state, named, details.get("code"))
            for dep, state, named, details in self.sent
            if dep == STARTUP_CHECK
        ]


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
            "expired": {"version": 3, "seed": 3, "expired": True},
        },
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def reports() -> Reports:
    return Reports()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(time.time())


@pytest.fixture
def start(
    data_dir: Path, trusted: TrustedKeys, reports: Reports, clock: ManualClock
) -> Iterator[Any]:
    """Build an updater on ``data_dir`` (as a starting agent does) and restore."""
    built: list[Updater] = []

    def build() -> tuple[Updater, ModelServer]:
        server = ModelServer()
        updater = make_updater(
            data_dir, trusted=trusted, reporter=reports, server=server, clock=clock
        )
        built.append(updater)
        updater.restore()
        return updater, server

    yield build
    for updater in built:
        updater.close()


def served(server: ModelServer) -> tuple[str, int] | None:
    active = server.active
    return (active.name, active.version) if active is not None else None


def state_json(data_dir: Path) -> dict[str, Any]:
    return dict(json.loads((data_dir / "state.json").read_bytes()))


def now() -> datetime:
    return datetime.now(UTC)


def refusal(data_dir: Path, model: InstalledModel, trusted: TrustedKeys) -> str:
    """The cause code with which start-up verification refuses ``model`` (the test fails
    if it verifies)."""
    with pytest.raises(UntrustedModelError) as caught:
        verify_installed(ModelStore(data_dir), model, trusted=trusted, now=now())
    return caught.value.cause_code


# ------------------------------------------------------------- verify_installed


def test_a_genuine_install_verifies(
    data_dir: Path, artifacts: dict[str, Artifact], trusted: TrustedKeys
) -> None:
    model = place_model(data_dir, artifacts["v1"])
    verified = verify_installed(ModelStore(data_dir), model, trusted=trusted, now=now())
    assert verified.payload == artifacts["v1"][1]
    assert verified.manifest == artifacts["v1"][0].manifest
    assert not verified.expired


def test_a_planted_model_without_a_manifest_is_refused(
    data_dir: Path, artifacts: dict[str, Artifact], trusted: TrustedKeys
) -> None:
    plant_model(data_dir, artifacts["v2"][1])
    store = ModelStore(data_dir)
    assert store.state.current is not None
    with pytest.raises(UntrustedModelError, match="refusing to serve digits v9") as caught:
        verify_installed(store, store.state.current, trusted=trusted, now=now())
    assert caught.value.cause_code == "state_error"


def test_a_model_signed_by_an_untrusted_key_is_refused(
    data_dir: Path, artifacts: dict[str, Artifact], trusted: TrustedKeys
) -> None:
    model = place_model(data_dir, artifacts["v1"])
    forged = sign_manifest(artifacts["v1"][0].manifest, [generate_signing_key()])
    (data_dir / "slots" / model.slot / MANIFEST_FILE).write_bytes(forged.to_bytes())
    assert refusal(data_dir, model, trusted) == "unknown_key"


def test_too_few_signatures_for_the_threshold_are_refused(
    data_dir: Path, artifacts: dict[str, Artifact], key: SigningKey
) -> None:
    model = place_model(data_dir, artifacts["v1"])
    two_of_two = TrustedKeys.of([key.public_key, generate_signing_key().public_key], threshold=2)
    assert refusal(data_dir, model, two_of_two) == "threshold_not_met"


def test_one_flipped_byte_is_refused(
    data_dir: Path, artifacts: dict[str, Artifact], trusted: TrustedKeys
) -> None:
    model = place_model(data_dir, artifacts["v1"])
    flip_byte(data_dir, model.slot, offset=100)
    assert refusal(data_dir, model, trusted) == "payload_hash"


@pytest.mark.parametrize("change", [b"x", b""])
def test_a_payload_of_another_length_is_refused(
    data_dir: Path, artifacts: dict[str, Artifact], trusted: TrustedKeys, change: bytes
) -> None:
    model = place_model(data_dir, artifacts["v1"])
    path = data_dir / "slots" / model.slot / PAYLOAD_FILE
    payload = path.read_bytes()
    path.write_bytes(payload + change if change else payload[:-1])
    assert refusal(data_dir, model, trusted) == "payload_length"


def test_a_state_record_that_names_another_model_is_refused(
    data_dir: Path, artifacts: dict[str, Artifact], trusted: TrustedKeys
) -> None:
    """A genuine v1 slot passed off as v2 by a forged state.json."""
    model = place_model(data_dir, artifacts["v1"])
    with pytest.raises(UntrustedModelError, match=r"state\.json records digits v2") as caught:
        verify_installed(
            ModelStore(data_dir),
            InstalledModel(model.slot, "digits", 2, model.sha256, "onnx", 1.0),
            trusted=trusted,
            now=now(),
        )
    assert caught.value.cause_code == "state_error"


def test_an_expired_model_verifies_flagged_expired(
    data_dir: Path,
    artifacts: dict[str, Artifact],
    trusted: TrustedKeys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = place_model(data_dir, artifacts["expired"])
    with caplog.at_level(logging.WARNING, logger="edge_agent.ota.reverify"):
        verified = verify_installed(ModelStore(data_dir), model, trusted=trusted, now=now())
    assert verified.expired
    assert "digits v3 in slot a: manifest expired at" in caplog.text


# ------------------------------------------------------ the updater at start-up


def test_a_normal_restart_serves_the_installed_model(
    data_dir: Path, artifacts: dict[str, Artifact], start: Any, reports: Reports
) -> None:
    place_model(data_dir, artifacts["v1"])
    place_model(data_dir, artifacts["v2"])
    before = state_json(data_dir)
    updater, server = start()
    assert served(server) == ("digits", 2)
    assert updater.problems == []
    assert not updater.serving_expired()
    assert reports.startup() == []
    assert state_json(data_dir) == before  # the rollback candidate is kept


def test_a_planted_model_is_not_served(
    data_dir: Path,
    artifacts: dict[str, Artifact],
    start: Any,
    reports: Reports,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plant_model(data_dir, artifacts["v2"][1])
    with caplog.at_level(logging.ERROR, logger="edge_agent.ota.updates"):
        updater, server = start()
    assert served(server) is None
    assert reports.startup() == [(InstallState.FAILED, ("digits", 9), "untrusted_model")]
    assert [(p.code, p.served) for p in updater.problems] == [("untrusted_model", False)]
    assert "cannot serve digits v9 from slot a: refusing to serve" in caplog.text
    assert "no installed model passed the start-up check" in caplog.text
    assert state_json(data_dir)["current"] is None  # a later genuine deploy installs


def test_a_tampered_current_model_falls_back_to_the_previous_one(
    data_dir: Path, artifacts: dict[str, Artifact], start: Any, reports: Reports
) -> None:
    place_model(data_dir, artifacts["v1"])
    current = place_model(data_dir, artifacts["v2"])
    flip_byte(data_dir, current.slot)
    updater, server = start()
    assert served(server) == ("digits", 1)
    assert reports.startup() == [(InstallState.FAILED, ("digits", 2), "untrusted_model")]
    state = state_json(data_dir)
    assert (state["current"]["version"], state["previous"]) == (1, None)
    assert state["highest"] == {"digits": 2}  # the rollback floor stays
    assert "payload_hash" in updater.problems[0].reason


def test_a_tampered_rollback_candidate_is_dropped(
    data_dir: Path, artifacts: dict[str, Artifact], start: Any, reports: Reports
) -> None:
    previous = place_model(data_dir, artifacts["v1"])
    place_model(data_dir, artifacts["v2"])
    flip_byte(data_dir, previous.slot)
    updater, server = start()
    assert served(server) == ("digits", 2)
    assert reports.startup() == [(InstallState.FAILED, ("digits", 1), "untrusted_model")]
    state = state_json(data_dir)
    assert (state["current"]["version"], state["previous"]) == (2, None)
    assert [(p.slot, p.served) for p in updater.problems] == [(previous.slot, False)]


def test_nothing_is_served_when_both_models_are_tampered(
    data_dir: Path, artifacts: dict[str, Artifact], start: Any, reports: Reports
) -> None:
    previous = place_model(data_dir, artifacts["v1"])
    current = place_model(data_dir, artifacts["v2"])
    flip_byte(data_dir, previous.slot)
    (data_dir / "slots" / current.slot / MANIFEST_FILE).unlink()
    _updater, server = start()
    assert served(server) is None
    assert [code for _state, _model, code in reports.startup()] == ["untrusted_model"] * 2
    state = state_json(data_dir)
    assert (state["current"], state["previous"]) == (None, None)


def test_an_expired_model_is_served_and_reported(
    data_dir: Path, artifacts: dict[str, Artifact], start: Any, reports: Reports
) -> None:
    place_model(data_dir, artifacts["expired"])
    updater, server = start()
    assert served(server) == ("digits", 3)
    assert updater.serving_expired()
    assert reports.startup() == [(InstallState.INSTALLED, ("digits", 3), "expired")]
    assert [(p.code, p.served) for p in updater.problems] == [("expired", True)]


def test_a_rollback_to_a_tampered_model_is_refused(
    data_dir: Path,
    artifacts: dict[str, Artifact],
    start: Any,
    reports: Reports,
    caplog: pytest.LogCaptureFixture,
) -> None:
    previous = place_model(data_dir, artifacts["v1"])
    place_model(data_dir, artifacts["v2"])
    updater, server = start()
    flip_byte(data_dir, previous.slot)  # after the start-up check
    with caplog.at_level(logging.ERROR, logger="edge_agent.ota.updates"):
        updater.on_rollback(Rollback(model="digits"), "cmd-1")
    assert served(server) == ("digits", 2)
    deployment, state, _model, details = reports.sent[-1]
    assert (deployment, state, details["code"]) == (
        "rollback-cmd-1",
        InstallState.FAILED,
        "untrusted_model",
    )
    assert "rollback of digits refused: refusing to serve digits v1" in caplog.text
    assert state_json(data_dir)["previous"] is None
    assert [p.code for p in updater.problems] == ["untrusted_model"]


def test_a_served_model_that_expires_while_running_is_flagged(
    data_dir: Path, artifacts: dict[str, Artifact], start: Any, clock: ManualClock
) -> None:
    place_model(data_dir, artifacts["v1"])
    updater, server = start()
    assert not updater.serving_expired()
    clock.now += 31 * 24 * 3600  # the test artifacts are valid for 30 days
    assert updater.serving_expired()
    assert served(server) == ("digits", 1)
