"""A real ``fedge-agent run`` process re-verifies its installed models at start-up.

The attack (issue 17, finding 5): whoever can write the agent's data directory
plants a model file and a forged ``state.json`` pointing at it; the agent used to
serve it, since only the unsigned ``state.json`` hash was checked. Each test
prepares a data directory, starts the agent process on a real mosquitto and asks
its local endpoint what it serves, what ``/v1/health`` reports, and what the agent
told the coordinator (``install_status`` under the deployment id ``startup-check``).
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compress.artifact import read_artifact_unverified
from compress.keys import SigningKey
from edge_agent.protocol import Channel, InstallState, InstallStatus, decode, device_topic
from tests.fleet_support import (
    AgentProcess,
    Mosquitto,
    free_port,
    make_artifact,
    public_key_file,
    wait_for,
)
from tests.ota_support import Artifact, flip_byte, place_model, plant_model
from tests.test_delivery_mqtt import Subscriber, http_json

DEVICE = "dev-0"
pytestmark = pytest.mark.slow


@pytest.fixture
def broker_users() -> list[str]:
    return [DEVICE]


@pytest.fixture(scope="module")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, signing_keys: list[SigningKey]
) -> dict[str, Artifact]:
    directory = tmp_path_factory.mktemp("artifacts")
    key = signing_keys[0]
    return {
        f"v{v}": read_artifact_unverified(make_artifact(directory, key, version=v, seed=v))
        for v in (1, 2)
    }


@pytest.fixture
def trust(tmp_path: Path, signing_key: SigningKey) -> Path:
    return public_key_file(tmp_path / "keys", signing_key)


@pytest.fixture
def events(broker: Mosquitto) -> Iterator[Subscriber]:
    """What the device publishes on its events channel."""
    subscriber = Subscriber(broker, device_topic(DEVICE, Channel.EVENTS))
    yield subscriber
    subscriber.close()


class Started:
    """An agent process with its HTTP port."""

    def __init__(self, broker: Mosquitto, data_dir: Path, trust: Path) -> None:
        self.port = free_port()
        self.process = AgentProcess(broker, DEVICE, data_dir, trust, http_port=self.port)
        self.health: dict[str, Any] = wait_for(self._health, what="the agent's /v1/health")

    def _health(self) -> dict[str, Any] | None:
        try:
            return dict(http_json(self.port, "/v1/health"))
        except urllib.error.HTTPError as error:  # 503: no model
            return dict(json.loads(error.read()))
        except OSError:
            assert self.process.alive(), self.process.log_text()
            return None

    def served(self) -> int | None:
        model = self.health["model"]
        return int(model["version"]) if model is not None else None


@pytest.fixture
def start(broker: Mosquitto, trust: Path) -> Iterator[Any]:
    started: list[Started] = []

    def run(data_dir: Path) -> Started:
        agent = Started(broker, data_dir, trust)
        started.append(agent)
        return agent

    yield run
    for agent in started:
        agent.process.kill()


def startup_reports(events: Subscriber, count: int) -> list[tuple[InstallState, str | None]]:
    """The first ``count`` start-up check reports the device published."""

    def reports() -> list[tuple[InstallState, str | None]] | None:
        found = []
        for _topic, data in list(events.messages):
            message = decode(data).message
            if isinstance(message, InstallStatus) and message.deployment_id == "startup-check":
                found.append((message.state, message.error_code))
        return found if len(found) >= count else None

    result: list[tuple[InstallState, str | None]] = wait_for(reports, what="start-up reports")
    return result


def test_a_normal_restart_still_serves_the_installed_model(
    tmp_path: Path, artifacts: dict[str, Artifact], start: Any
) -> None:
    data_dir = tmp_path / DEVICE
    place_model(data_dir, artifacts["v1"])
    place_model(data_dir, artifacts["v2"])
    for _restart in range(2):
        agent = start(data_dir)
        assert (agent.health["status"], agent.served()) == ("ok", 2)
        assert agent.health["model_problems"] == []
        assert agent.health["model_expired"] is False
        assert agent.process.stop() == 0
    assert "cannot serve" not in agent.process.log_text()


def test_a_planted_unsigned_model_is_not_served(
    tmp_path: Path, artifacts: dict[str, Artifact], start: Any, events: Subscriber
) -> None:
    data_dir = tmp_path / DEVICE
    plant_model(data_dir, artifacts["v2"][1])  # a real model, but no signed manifest
    agent = start(data_dir)
    assert (agent.health["status"], agent.served()) == ("no_model", None)
    [problem] = agent.health["model_problems"]
    assert (problem["code"], problem["version"], problem["served"]) == (
        "untrusted_model",
        9,
        False,
    )
    log = agent.process.log_text()
    assert "cannot serve digits v9 from slot a: refusing to serve digits v9" in log
    assert "no installed model passed the start-up check" in log
    assert startup_reports(events, 1) == [(InstallState.FAILED, "untrusted_model")]


def test_a_tampered_model_is_not_served_and_the_previous_one_is(
    tmp_path: Path, artifacts: dict[str, Artifact], start: Any, events: Subscriber
) -> None:
    data_dir = tmp_path / DEVICE
    place_model(data_dir, artifacts["v1"])
    current = place_model(data_dir, artifacts["v2"])
    flip_byte(data_dir, current.slot, offset=200)
    agent = start(data_dir)
    assert (agent.health["status"], agent.served()) == ("ok", 1)
    assert [p["version"] for p in agent.health["model_problems"]] == [2]
    assert "payload_hash" in agent.process.log_text()
    assert startup_reports(events, 1) == [(InstallState.FAILED, "untrusted_model")]


def test_a_tampered_rollback_candidate_is_not_kept(
    tmp_path: Path, artifacts: dict[str, Artifact], start: Any
) -> None:
    data_dir = tmp_path / DEVICE
    previous = place_model(data_dir, artifacts["v1"])
    place_model(data_dir, artifacts["v2"])
    flip_byte(data_dir, previous.slot)
    agent = start(data_dir)
    assert agent.served() == 2
    assert [(p["version"], p["served"]) for p in agent.health["model_problems"]] == [(1, False)]
    assert agent.process.stop() == 0
    state = json.loads((data_dir / "state.json").read_bytes())
    assert (state["current"]["version"], state["previous"]) == (2, None)
