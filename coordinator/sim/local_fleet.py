"""A fleet of real agents in one process, for simulations, benchmarks and tests.

:func:`write_shards` splits a labelled dataset over ``clients`` devices with
Dirichlet(``alpha``) label skew (:func:`coordinator.sim.datasets.dirichlet_partition`)
and writes one ``local.npz`` per device, the layout ``fedge-agent run
--train-data DIR`` reads. :class:`LocalFleet` starts one
:class:`edge_agent.agent.Agent` per shard in this process, each with its own MQTT
connection and data directory, exactly as on a device (same protocol, same broker
ACL, same training code); only the process is shared, and the agents' connections
are driven by a small pool of network threads (one
:class:`~edge_agent.transport.network_loop.NetworkLoop` per 250 agents) instead of a thread
each, so a thousand agents fit in one process.

Workflow::

    shards = write_shards(x, y, clients=10, alpha=0.5, directory=tmp / "data", seed=0)
    with LocalFleet.start(shards, broker_for=lambda device: broker_config(device),
                          trust=[public_key_path], root=tmp / "agents") as fleet:
        fleet.wait_eligible(hub, len(shards), timeout=20)
        run_training(hub, strategy, config)
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from coordinator.errors import RunError
from coordinator.lifecycle import Stoppable
from coordinator.link.port import Hub
from coordinator.sim.datasets import dirichlet_partition
from edge_agent.agent import Agent
from edge_agent.config.agent import (
    AgentConfig,
    BrokerConfig,
    TelemetryConfig,
    TrainingConfig,
    TransferConfig,
    TrustConfig,
)
from edge_agent.transport.network_loop import NetworkLoop

__all__ = ["LocalFleet", "save_shards", "write_shards"]

logger = logging.getLogger(__name__)

STOP_THREADS = 64
"""Agents :meth:`LocalFleet.stop` stops at a time."""


def write_shards(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    clients: int,
    alpha: float,
    directory: Path,
    seed: int = 0,
    min_examples: int = 10,
) -> list[Path]:
    """Split ``(x, y)`` over ``clients`` with Dirichlet label skew; one directory each.

    Returns:
        ``directory/shard<i>`` paths, each holding ``local.npz`` (arrays ``x``, ``y``).

    Raises:
        ValueError: see :func:`coordinator.sim.datasets.dirichlet_partition`.
    """
    labels = np.asarray(y, dtype=np.int64)
    parts = dirichlet_partition(labels, clients, alpha, seed=seed, min_examples=min_examples)
    return save_shards(x, labels, parts, directory)


def save_shards(
    x: npt.ArrayLike,
    y: npt.ArrayLike | None,
    parts: Sequence[npt.NDArray[np.int64]],
    directory: Path,
) -> list[Path]:
    """Write ``directory/shard<i>/local.npz`` (``x``, and ``y`` unless None) for each part.

    ``x`` may hold examples of any shape; ``y`` integer labels (kept int64), float
    targets (kept float32) or None (data for reconstruction: no ``y`` is written).

    Returns:
        The shard directories, in order.
    """
    features = np.asarray(x, dtype=np.float32)
    targets = None if y is None else np.asarray(y)
    if targets is not None:
        kind = np.int64 if targets.dtype.kind in "iub" else np.float32
        targets = targets.astype(kind, copy=False)
    shards = []
    for index, part in enumerate(parts):
        shard = directory / f"shard{index}"
        shard.mkdir(parents=True, exist_ok=True)
        arrays = {"x": features[part]}
        if targets is not None:
            arrays["y"] = targets[part]
        np.savez(shard / "local.npz", **arrays)  # type: ignore[arg-type]
        shards.append(shard)
    return shards


AGENTS_PER_NETWORK_LOOP = 250
"""Agents whose connections share one network thread (epoll): a small pool of
threads instead of one per agent, as the agents spend most of their time idle."""
CONNECT_BATCH = 50
"""Agents started before waiting for them to connect: hundreds of connections opened
at once on a few cores time out and retry in a storm."""
CONNECT_WAIT_S = 30.0


def _poll(done: Callable[[], bool], timeout: float, interval: float) -> bool:
    """Ask ``done`` every ``interval`` seconds: True once it is, False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(interval)
    return False


def _wait_connected(agents: Sequence[Agent]) -> None:
    _poll(lambda: all(a.connected for a in agents), CONNECT_WAIT_S, 0.02)


@dataclass
class LocalFleet(Stoppable):
    """In-process agents, one per shard (``None``: an agent without training data)."""

    agents: list[Agent]
    networks: list[NetworkLoop] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        shards: Sequence[Path | None],
        *,
        broker_for: Callable[[str], BrokerConfig],
        trust: Sequence[Path],
        root: Path,
        prefix: str = "sim",
        stall_timeout_s: float = 1.0,
        telemetry_interval_s: float = 5.0,
        models: Sequence[str] = (),
        torch_threads: int = 1,
    ) -> LocalFleet:
        """Start one agent per shard, named ``<prefix>NN``.

        Args:
            shards: Training data directory of each agent (None: no data).
            broker_for: The broker settings of a device id (its MQTT user).
            trust: Public keys the agents trust for deployments.
            root: Parent of the agents' data directories.
            prefix: Device id prefix.
            stall_timeout_s: Agents ask for missing chunks after this silence.
            telemetry_interval_s: Seconds between each agent's telemetry batches.
            models: PyTorch model specs the agents may train besides the zoo (the
                operator's own factory, importable in this process).
            torch_threads: Threads each agent's torch training uses (the agents
                share this machine's cores).
        """
        agents: list[Agent] = []
        loops = max(1, math.ceil(len(shards) / AGENTS_PER_NETWORK_LOOP))
        networks = [NetworkLoop(name=f"{prefix}-net{i}") for i in range(loops)]
        try:
            for network in networks:
                network.start()
            for index, shard in enumerate(shards):
                device_id = f"{prefix}{index:02d}"
                config = AgentConfig(
                    device_id=device_id,
                    broker=broker_for(device_id),
                    data_dir=root / device_id,
                    trust=TrustConfig(keys=tuple(trust)),
                    telemetry=TelemetryConfig(interval_s=telemetry_interval_s),
                    transfer=TransferConfig(stall_timeout_s=stall_timeout_s),
                    training=TrainingConfig(
                        data=shard,
                        feedback_max_examples=0,
                        models=tuple(models),
                        torch_threads=torch_threads,
                    ),
                )
                agent = Agent(config, network=networks[index % loops])
                agent.start()
                agents.append(agent)
                if len(agents) % CONNECT_BATCH == 0:
                    _wait_connected(agents[-CONNECT_BATCH:])
        except BaseException:
            cls(agents, networks).stop()
            raise
        return cls(agents, networks)

    def wait_eligible(self, hub: Hub, count: int, timeout: float) -> None:
        """Wait until ``hub`` sees ``count`` online devices with data.

        Raises:
            RunError: not within ``timeout`` seconds.
        """
        if not _poll(lambda: sum(r.can_train for r in hub.fleet()) >= count, timeout, 0.05):
            raise RunError(f"fewer than {count} devices with data came online in {timeout} s")

    def stop(self) -> None:
        """Stop every agent (many at a time), then their network threads.

        Each stop waits for the broker to acknowledge the offline status and for the
        DISCONNECT to go out, up to a few seconds on a busy loop: one after another,
        a thousand agents would take minutes.
        """
        if self.agents:
            workers = min(STOP_THREADS, len(self.agents))
            with concurrent.futures.ThreadPoolExecutor(workers, "fleet-stop") as pool:
                list(pool.map(lambda agent: agent.stop(), self.agents))
        for network in self.networks:
            network.close()
