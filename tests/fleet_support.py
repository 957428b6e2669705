"""Test support shared by the whole suite: waiting, a real mosquitto, artifacts, agents.

* :func:`wait_for`: THE way a test waits for something to happen (polls a condition,
  fails the test with what it waited for). Tests do not sleep a fixed time to let
  something happen, nor to prove that something did not happen: they wait for a
  positive event that must come after it, or check the pure engine with a fake clock.
* :class:`Mosquitto`: a mosquitto broker on a loopback port with the shipped
  least-privilege ACL and a password file; it can be stopped and started again on
  the same port (broker restart tests). Passwords are ``pw-<user>``.
  :func:`running_broker` runs THE broker of the suite: the body of the per-test
  ``broker`` and the per-module ``module_broker`` fixtures (tests/conftest.py).
* :func:`make_artifact`: a real int8-quantized, signed model artifact (a small MLP
  exported to ONNX), with knobs for the bad cases (tampered payload, wrong key,
  expired, broken health check).
* :class:`AgentProcess`: ``fedge-agent run`` in a separate process; SIGKILL-able.
* :func:`agent_config`: an :class:`~edge_agent.config.agent.AgentConfig` for in-process
  agents; :class:`InProcessFleet`: in-process agents on one shared network loop (or
  each on its own, as on a device); :func:`wait_trainers`: until a hub sees enough
  devices with training data.

The ``broker`` fixture (tests/conftest.py) starts a :class:`Mosquitto` that knows the
users of the module's ``broker_users`` fixture; ``module_broker`` is the same broker
for a whole module (``module_broker_users``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.artifact import read_artifact_unverified, write_artifact
from compress.families import init_weights
from compress.keys import SigningKey, save_keypair
from compress.manifest import HealthCheck, ReferenceTensor
from compress.onnx_export import export_onnx
from compress.signing import sign_manifest
from coordinator.delivery.deliveries import Deliveries
from coordinator.delivery.packaging import PackageRequest, package_model
from coordinator.link.broker_config import BrokerSetup, write_broker_config
from coordinator.link.ca import (
    CaFiles,
    coordinator_certificate,
    init_ca,
    issue_certificate,
    server_certificate,
)
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.link.port import Hub
from edge_agent.agent import Agent
from edge_agent.config.agent import (
    AgentConfig,
    BrokerConfig,
    TelemetryConfig,
    TransferConfig,
    TrustConfig,
)
from edge_agent.ota.installer import Checkpoint
from edge_agent.protocol import COORDINATOR_SENDER, MOSQUITTO_ACL
from edge_agent.transport.csr import make_key_and_csr
from edge_agent.transport.network_loop import NetworkLoop

TIMEOUT = 10.0
"""How long a test helper waits for a process or a port."""
WAIT_S = 90.0
"""How long :func:`wait_for` waits by default: reached only when the test fails
anyway, so it is generous (MQTT tests with 20 agents on a shared 2-core machine)."""
POLL_S = 0.02
FEATURES = 16
CLASSES = 4


def tool(name: str) -> str:
    """Path of a mosquitto tool; fails (does not skip) when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install mosquitto)")
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def post_json(port: int, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST ``body`` to an agent's local endpoint: its status and JSON answer (an error's too)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def password(user: str) -> str:
    """The test password of an MQTT user."""
    return f"pw-{user}"


def wait_for(condition: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; return its value or fail the test.

    ``what`` names the awaited event in the failure message. ``condition`` may
    itself fail the test (e.g. when a process it waits on has exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_S)


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway fleet CA (:mod:`coordinator.link.ca`), a server certificate for
    127.0.0.1 and a client certificate (CN ``client``); :meth:`issue` makes more
    client certificates from the same CA; :attr:`crl` is the CA's revocation list."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        """Generate the CA and both certificates (EC P-256, as ``fedge ca`` does)."""
        ca = init_ca(directory / "ca", name="fedge test CA")
        files = cls(ca.cert, *(directory / n for n in ("server.pem", "server.key",
                                                       "client.pem", "client.key")))  # fmt: skip
        cert, key = server_certificate(ca.directory, "127.0.0.1")
        files.server_cert.write_bytes(cert)
        files.server_key.write_bytes(key)
        files.issue("client")
        return files

    @property
    def ca_dir(self) -> Path:
        """The CA directory (``fedge ca`` commands take it)."""
        return self.ca.parent

    @property
    def crl(self) -> Path:
        """The CA's certificate revocation list."""
        return CaFiles(self.ca_dir).crl

    def issue(self, name: str) -> tuple[Path, Path]:
        """A client certificate with CN ``name`` (a device id, or a coordinator
        account) from this CA: (certificate, key); ``client`` is the default pair."""
        directory = self.server_cert.parent
        if name == "client":
            cert, key = self.client_cert, self.client_key
        else:
            cert, key = directory / f"{name}.pem", directory / f"{name}.client.key"
        if name == COORDINATOR_SENDER or name.startswith(f"{COORDINATOR_SENDER}@"):
            cert_pem, key_pem = coordinator_certificate(self.ca_dir, account=name)
        else:
            key_pem, csr_pem = make_key_and_csr(name)
            cert_pem = issue_certificate(self.ca_dir, csr_pem, device_id=name, force=True)
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        return cert, key


class Mosquitto:
    """A mosquitto broker with the shipped ACL; restartable on the same port.

    ``with Mosquitto(directory, users) as broker:`` starts it and stops it after.

    With ``tls``, the listener speaks TLS only and requires a client certificate
    signed by the test CA (mutual TLS) on top of the passwords. With ``generated``,
    the config is the one ``fedge broker config`` writes (client ids bound to
    usernames, persistence under the directory) instead of the suite's own.
    """

    def __init__(
        self,
        directory: Path,
        users: Sequence[str],
        tls: TlsFiles | None = None,
        *,
        generated: bool = False,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.tls = tls
        self.port = free_port()
        self.log = directory / "mosquitto.log"
        passwords = directory / "passwd"
        passwords.write_text("")
        for user in ("coordinator", *users):
            subprocess.run(
                [tool("mosquitto_passwd"), "-b", str(passwords), user, password(user)],
                check=True,
                capture_output=True,
            )
        passwords.chmod(0o600)
        acl = directory / "acl"
        acl.write_text(MOSQUITTO_ACL)
        run_as = "user root\n" if os.geteuid() == 0 else ""
        self.config = directory / "mosquitto.conf"
        tls_lines = (
            f"cafile {tls.ca}\ncertfile {tls.server_cert}\nkeyfile {tls.server_key}\n"
            "require_certificate true\n"
            if tls
            else ""
        )
        if generated:
            # with tls: mutual TLS, the certificate's CN is the username (no password)
            certs = (
                {
                    "tls_cert": tls.server_cert,
                    "tls_key": tls.server_key,
                    "cafile": tls.ca,
                    "crlfile": tls.crl,
                }
                if tls
                else {}
            )
            setup = BrokerSetup(directory, port=self.port, bind="127.0.0.1",
                                password_file=passwords, fleet_size=5000, **certs)  # fmt: skip
            self.config = write_broker_config(setup, overwrite=True).config
            with self.config.open("a") as conf:
                conf.write(run_as)
        else:
            self.config.write_text(
                f"listener {self.port} 127.0.0.1\n{tls_lines}allow_anonymous false\n"
                f"password_file {passwords}\nacl_file {acl}\npersistence false\n"
                f"max_queued_messages 100000\n{run_as}"
            )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """mqtt:// (or mqtts://) URL of the broker."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def broker(self, user: str) -> BrokerConfig:
        """Connection settings for ``user``."""
        tls = self.tls
        return BrokerConfig(
            host="127.0.0.1",
            port=self.port,
            tls=tls is not None,
            username=user,
            password=password(user),
            ca_file=tls.ca if tls else None,
            cert_file=tls.client_cert if tls else None,
            key_file=tls.client_key if tls else None,
            reconnect_min_s=1.0,
            reconnect_max_s=2.0,
        )

    def start(self) -> None:
        """Start the broker and wait until it listens."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [tool("mosquitto"), "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self._listening, TIMEOUT, what=f"mosquitto to listen: {self.log}")

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"mosquitto exited: {self.log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def reload(self) -> None:
        """SIGHUP the broker (it re-reads its password file, ACL and CRL) and wait
        until it says it has."""
        assert self.process is not None
        done = self.log.read_text().count("Reloading config.") + 1
        self.process.send_signal(signal.SIGHUP)
        wait_for(lambda: self.log.read_text().count("Reloading config.") >= done, TIMEOUT,
                 what=f"mosquitto to reload its config: {self.log}")  # fmt: skip

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the broker (SIGKILL: no goodbye to the clients)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)
        self.process = None


@contextlib.contextmanager
def running_broker(
    directory: Path, users: Sequence[str], *, generated: bool = False
) -> Iterator[Mosquitto]:
    """A running :class:`Mosquitto` under ``directory / "broker"`` that knows ``users``.

    ``with running_broker(tmp_path, users) as broker:`` in a fixture of any scope
    (the ``broker`` and ``module_broker`` fixtures are this); stopped at the end.
    ``generated``: on the config ``fedge broker config`` writes.
    """
    with Mosquitto(directory / "broker", users, generated=generated) as instance:
        yield instance


def make_artifact(
    directory: Path,
    key: SigningKey,
    *,
    version: int,
    name: str = "digits",
    seed: int = 0,
    expired: bool = False,
    tamper_payload: bool = False,
    break_health_check: bool = False,
    hidden: int = 32,
) -> Path:
    """A signed int8 MLP artifact; the flags make the bad variants."""
    rng = np.random.default_rng(seed)
    weights = init_weights("mlp", [FEATURES, hidden, CLASSES], rng)
    model = directory / f"{name}-{version}-{seed}.onnx"
    model.write_bytes(export_onnx("mlp", weights))
    out = directory / f"{name}-v{version}-{seed}{'-bad' if break_health_check else ''}.fedge"
    now = datetime.now(UTC)
    package_model(
        PackageRequest(
            model_path=model,
            name=name,
            version=version,
            keys=[key],
            out=out,
            quantize="int8",
            calibration=rng.random((32, FEATURES), dtype=np.float32),
            expires_in=timedelta(days=30),
        ),
        now=now - timedelta(days=60) if expired else now,
    )
    if tamper_payload:  # the payload is the container's tail: flip its last byte
        data = bytearray(out.read_bytes())
        data[-1] ^= 0xFF
        out.write_bytes(bytes(data))
    if break_health_check:
        signed, payload = read_artifact_unverified(out)
        manifest = signed.manifest
        check = manifest.health_check
        assert check is not None
        wrong = {
            name: ReferenceTensor.from_array(1.0 - ref.array())
            for name, ref in check.outputs.items()
        }
        broken = HealthCheck(inputs=check.inputs, outputs=wrong, rtol=0.0, atol=0.01)
        signed = sign_manifest(replace(manifest, health_check=broken), [key])
        write_artifact(out, signed, payload)
    return out


def public_key_file(directory: Path, key: SigningKey) -> Path:
    """Save a key pair under ``directory``; return the public key's path."""
    directory.mkdir(parents=True, exist_ok=True)
    _private, public = save_keypair(key, directory, overwrite=True)
    return public


def agent_config(
    broker: Mosquitto, device_id: str, data_dir: Path, trust: Path, /, **changes: Any
) -> AgentConfig:
    """Config of an in-process agent with quick timers; ``changes`` replace fields
    (``broker=`` other connection settings than ``broker``'s for ``device_id``)."""
    fields: dict[str, Any] = {
        "device_id": device_id,
        "broker": broker.broker(device_id),
        "data_dir": data_dir,
        "trust": TrustConfig(keys=(trust,)),
        "telemetry": TelemetryConfig(interval_s=1.0),
        "transfer": TransferConfig(window=8, stall_timeout_s=1.0),
    }
    fields.update(changes)
    return AgentConfig(**fields)


class InProcessFleet:
    """In-process agents on one shared network loop, as ``fedge simulate`` runs them.

    Workflow::

        fleet = InProcessFleet(broker, tmp_path / "agents", trust)
        fleet.start_all(["d0", "d1"])       # or fleet.start("d0", tags=("lab",))
        fleet.agents["d0"].stop(); fleet.start("d0")   # a restart keeps its data dir
        sent = fleet.stop_agents()          # telemetry windows the broker took
        fleet.stop()                        # agents, then the loop (idempotent)

    An agent's config is :func:`agent_config` with the keyword changes given to
    :meth:`start` (``broker=``, ``transfer=``, ``training=TrainingConfig(data=shard)``
    for an agent that trains, ...). With ``private_loop=True`` an agent runs on its own
    loop, as on a device (the single-link path); ``checkpoint`` is the agent's install
    checkpoint (crash tests). :meth:`build` makes an agent without starting it (a test
    that drives its message handler directly).
    """

    def __init__(
        self, broker: Mosquitto, root: Path, trust: Path, *, name: str = "fleet-net"
    ) -> None:
        self.broker = broker
        self.root = root
        self.trust = trust
        self.network = NetworkLoop(name=name)
        self.network.start()
        self.agents: dict[str, Agent] = {}

    def build(
        self,
        device_id: str,
        *,
        private_loop: bool = False,
        checkpoint: Checkpoint | None = None,
        **changes: Any,
    ) -> Agent:
        """One agent, not started (and not stopped by :meth:`stop`)."""
        config = agent_config(self.broker, device_id, self.root / device_id, self.trust, **changes)
        network = None if private_loop else self.network
        if checkpoint is None:
            return Agent(config, network=network)
        return Agent(config, checkpoint=checkpoint, network=network)

    def start(
        self,
        device_id: str,
        *,
        private_loop: bool = False,
        checkpoint: Checkpoint | None = None,
        **changes: Any,
    ) -> Agent:
        """Start (or restart, with the same data directory) one agent."""
        agent = self.build(device_id, private_loop=private_loop, checkpoint=checkpoint, **changes)
        agent.start()
        self.agents[device_id] = agent
        return agent

    def start_all(self, device_ids: Sequence[str], **changes: Any) -> list[Agent]:
        """Start one agent per id (same changes for each); return them in order."""
        return [self.start(device_id, **changes) for device_id in device_ids]

    def wait_connected(self) -> None:
        """Until every started agent is connected to the broker."""
        wait_for(lambda: all(a.connected for a in self.agents.values()), what="agents connected")

    def stop_agents(self) -> int:
        """Stop every agent; the telemetry windows the broker acknowledged from them."""
        for agent in self.agents.values():
            agent.stop()
        return sum(agent.telemetry_published for agent in self.agents.values())

    def stop(self) -> None:
        """Stop every agent, then the shared loop."""
        self.stop_agents()
        self.network.close()


def wait_trainers(hub: Hub, count: int, timeout: float = WAIT_S) -> None:
    """Until ``hub`` sees ``count`` online devices with training data."""
    wait_for(
        lambda: sum(r.can_train for r in hub.fleet()) >= count,
        timeout,
        what=f"{count} devices with training data online",
    )


ACCEPT_WAIT_S = 2.0
"""How long the tests' deploys wait for the devices' answers."""


def coordinator(broker: Mosquitto, **changes: Any) -> MqttHub:
    """A started hub on ``broker``, as the ``coordinator`` user."""
    config = HubConfig(broker=broker.broker("coordinator"), **changes)
    instance = MqttHub(config)
    instance.start()
    return instance


def open_deliveries(hub: Hub) -> Deliveries:
    """One-shot deliveries on ``hub`` with the tests' accept wait."""
    return Deliveries(hub, accept_wait_s=ACCEPT_WAIT_S)


class AgentProcess:
    """``fedge-agent run`` as a separate process."""

    def __init__(
        self,
        broker: Mosquitto,
        device_id: str,
        data_dir: Path,
        trust: Path,
        *,
        http_port: int | None = None,
        crash_at: str | None = None,
        config_file: bool = False,
        stall_timeout_s: float | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        """Start the agent; ``stall_timeout_s`` sets ``[transfer]`` (in a config file)."""
        self.device_id = device_id
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        secret = data_dir.parent / f"{device_id}.password"
        secret.write_text(password(device_id))
        self.log = data_dir.parent / f"{device_id}.log"
        self.http_port = http_port
        if config_file or stall_timeout_s is not None:  # agent.toml, as a device owner would
            config = data_dir.parent / f"{device_id}.toml"
            http = f'http = "127.0.0.1:{http_port}"\n' if http_port else ""
            stall = (
                ""
                if stall_timeout_s is None
                else f"[transfer]\nstall_timeout_s = {stall_timeout_s}\n"
            )
            config.write_text(
                f'device_id = "{device_id}"\ndata_dir = "{data_dir}"\n{http}'
                f'[broker]\nurl = "{broker.url}"\npassword_file = "{secret}"\n'
                f'[trust]\nkeys = ["{trust}"]\nthreshold = 1\n[telemetry]\ninterval_s = 1\n{stall}'
            )
            options = ["--config", str(config)]
        else:
            options = [
                "--device-id", device_id, "--broker", broker.url,
                "--password-file", str(secret), "--trust", str(trust),
                "--data-dir", str(data_dir), "--telemetry-interval", "1",
                *(["--http", f"127.0.0.1:{http_port}"] if http_port else []),
            ]  # fmt: skip
        # a crash point needs the test-only entry point (the agent honours none)
        entry = ["edge_agent.cli"] if crash_at is None else ["tests.agent_crash", crash_at]
        args = [sys.executable, "-m", *entry, "-vv", "run", *options, *extra]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=TIMEOUT)

    def stop(self) -> int:
        """SIGTERM and wait; return the exit status."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        """What the agent logged."""
        return self.log.read_text(errors="replace")
