"""Benchmark: OTA fan-out of one artifact to a fleet, against raw MQTT publishing.

Builds a signed int8 artifact of about ``--size-mib`` (an MLP 64-H-H-10 with He-initialised
weights, H chosen to hit the size, exported to ONNX and packaged with
:func:`coordinator.delivery.packaging.package_model`, int8 dynamic). Then, ``--repeats`` times
each, on a fresh mosquitto broker (anonymous, 127.0.0.1 only, no ACL, ``sys_interval 1``):

* **fedge**: ``--agents`` in-process :class:`edge_agent.agent.Agent` instances (fresh
  data directories, default settings) and :class:`coordinator.delivery.deliveries.Deliveries` on a
  :class:`coordinator.link.hub.MqttHub`;
  the clock starts right before ``deliveries.deploy(artifact, Target.parse("all"))``.
  Reported: when ``deploy`` returned (every agent accepted the signed manifest, the
  chunks are queued), when every agent was past downloading (its first report of
  ``verifying`` / ``installing`` / ``installed`` seen by ``wait(..., on_change=...)``,
  timestamped with the coordinator's ``updated_at``), and when every agent reported
  ``installed`` (payload hashed, model loaded, health check passed, A/B switch);
* **raw paho**: the same payload bytes cut in ``--chunk-kib`` messages, published
  once with QoS 1 on one topic by one paho client to ``--agents`` paho subscriber
  clients (QoS 1) in the same process (same MQTT version, clean session and inflight
  window as fedge's link); the clock runs from the first publish until every
  subscriber has received every byte.

Bytes: what the sender published (MQTT payloads: the coordinator's deploy commands and
chunks, counted by wrapping its link's publish; the raw publisher's messages), and what
the broker received and sent in total over the measurement (``$SYS/broker/bytes/*``:
every client, MQTT framing and acknowledgements included; agents' reports count).

Each figure is the median over the repeats, taken per figure. Every agent, client and
broker is stopped, and the temporary directory (agents' data dirs) removed, on the way
out. Prints a table and writes JSON::

    python benchmarks/ota_fanout.py --out benchmarks/results/ota_fanout.json
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from _support import argument_parser, environment, mosquitto, wait_until, write_json
from paho.mqtt.enums import CallbackAPIVersion

from compress.families import init_weights
from compress.keys import generate_signing_key, save_keypair
from compress.onnx_export import export_onnx
from coordinator.delivery.deliveries import Artifact, Deliveries
from coordinator.delivery.packaging import PackageRequest, package_model
from coordinator.delivery.tracker import DeploymentTracker, DeviceState
from coordinator.link.fleet import Target
from coordinator.link.hub import HubConfig, MqttHub
from edge_agent.agent import Agent
from edge_agent.config.agent import AgentConfig, BrokerConfig, TrustConfig
from edge_agent.transport.mqtt import MAX_INFLIGHT

DEFAULT_OUT = Path("benchmarks/results/ota_fanout.json")
FEATURES = 64
CLASSES = 10
KIB = 1024
MIB = 1024 * KIB
STARTUP_TIMEOUT_S = 60.0
RAW_TOPIC = "bench/raw/payload"
PAST_DOWNLOAD = (DeviceState.VERIFYING, DeviceState.INSTALLING, DeviceState.INSTALLED)


# --------------------------------------------------------------------------- helpers


def paho_client(client_id: str) -> mqtt.Client:
    """A paho client set up like fedge's MqttLink (MQTT 3.1.1, clean session, inflight)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311
    )
    client.max_inflight_messages_set(MAX_INFLIGHT)
    return client


def stop_client(client: mqtt.Client) -> None:
    """Disconnect and stop the network thread."""
    with suppress(Exception):
        client.disconnect()
    client.loop_stop()


class SysMonitor:
    """Reads the broker's cumulative byte counters from ``$SYS``."""

    def __init__(self, port: int) -> None:
        """Connect and subscribe (``$SYS`` is published every second)."""
        self._cond = threading.Condition()
        self._values: dict[str, int] = {}
        self._ticks = 0
        self._client = paho_client("bench-sys-monitor")
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_args: subscribed.set()
        self._client.on_connect = lambda client, *_args: client.subscribe(
            [("$SYS/broker/bytes/received", 0), ("$SYS/broker/bytes/sent", 0)]
        )
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not subscribed.wait(STARTUP_TIMEOUT_S):
            raise TimeoutError("no $SYS subscription")

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._values[msg.topic.rsplit("/", 1)[-1]] = int(msg.payload)
            if msg.topic.endswith("/sent"):
                self._ticks += 1
            self._cond.notify_all()

    def snapshot(self) -> dict[str, int]:
        """The counters as of a ``$SYS`` tick that started after this call.

        ``bytes/sent`` changes every tick (the ``$SYS`` messages to this client), so two
        of its updates mean a whole tick passed; ``bytes/received`` is only published
        when it changed, so its latest value is current then.
        """
        with self._cond:
            target = self._ticks + 2
            if not self._cond.wait_for(lambda: self._ticks >= target, timeout=10):
                raise TimeoutError("no $SYS update from the broker")
            return {"received": self._values.get("received", 0), "sent": self._values["sent"]}

    def stop(self) -> None:
        """Disconnect."""
        stop_client(self._client)


# --------------------------------------------------------------------------- artifact


def hidden_for(size_bytes: int) -> int:
    """Hidden width H of a 64-H-H-10 int8 MLP of about ``size_bytes``.

    int8 weights take ``64H + H^2 + 10H`` bytes, float32 biases ``4(2H + 10)``.
    """
    b = FEATURES + CLASSES + 8
    return max(8, round((-b + math.sqrt(b * b + 4 * size_bytes)) / 2))


def build_artifact(directory: Path, size_bytes: int, seed: int) -> tuple[Path, Path, int]:
    """A signed int8 MLP artifact of about ``size_bytes``; its path, trust key, H."""
    hidden = hidden_for(size_bytes)
    rng = np.random.default_rng(seed)
    weights = init_weights("mlp", [FEATURES, hidden, hidden, CLASSES], rng)
    onnx_path = directory / "fanout.onnx"
    onnx_path.write_bytes(export_onnx("mlp", weights))
    key = generate_signing_key()
    _private, public = save_keypair(key, directory / "keys")
    out = directory / "fanout-v1.fedge"
    package_model(
        PackageRequest(
            model_path=onnx_path,
            name="fanout",
            version=1,
            keys=[key],
            out=out,
            quantize="int8",
            expires_in=timedelta(days=1),
            seed=seed,
        ),
        now=datetime.now(UTC),
    )
    return out, public, hidden


# --------------------------------------------------------------------------- fedge


@dataclass
class FedgeRun:
    """One fedge deployment to the fleet."""

    deploy_returned_s: float
    all_past_download_s: float
    all_installed_s: float
    installed: int
    coordinator_bytes: dict[str, int]
    coordinator_messages: dict[str, int]
    broker_bytes_received: int
    broker_bytes_sent: int
    first_seen_past_download: dict[str, int] = field(default_factory=dict)
    past_download_s_first_median: tuple[float, float] = (0.0, 0.0)
    installed_s_first_median: tuple[float, float] = (0.0, 0.0)


def _channel(topic: str) -> str:
    if "/broadcast/" in topic:
        return "chunks_broadcast"
    last = topic.rsplit("/", 1)[-1]
    return {"chunks": "chunks_unicast", "cmd": "commands"}.get(last, "other")


def count_publishes(coordinator: MqttHub, sizes: Counter[str], counts: Counter[str]) -> None:
    """Count what the coordinator publishes, by kind, by wrapping its link's publish."""
    link = coordinator._link
    original = link.publish_info

    def publish_info(topic: str, payload: bytes, **kwargs: Any) -> Any:
        info = original(topic, payload, **kwargs)
        if info is not None:
            sizes[_channel(topic)] += len(payload)
            counts[_channel(topic)] += 1
        return info

    link.publish_info = publish_info  # type: ignore[method-assign]


def run_fedge(
    workdir: Path, artifact_path: Path, trust: Path, agents: int, chunk_size: int, timeout: float
) -> FedgeRun:
    """Start a broker, the agents and a coordinator; deploy once; tear everything down."""
    fleet: list[Agent] = []
    coordinator: MqttHub | None = None
    monitor: SysMonitor | None = None
    with mosquitto(workdir / "broker", sys_interval=1, timeout=STARTUP_TIMEOUT_S) as port:
        try:
            for i in range(agents):
                device_id = f"dev-{i:03d}"
                agent = Agent(
                    AgentConfig(
                        device_id=device_id,
                        broker=BrokerConfig(host="127.0.0.1", port=port, tls=False),
                        data_dir=workdir / "agents" / device_id,
                        trust=TrustConfig(keys=(trust,)),
                    )
                )
                fleet.append(agent)
                agent.start()
            wait_until(
                lambda: all(a.connected for a in fleet), STARTUP_TIMEOUT_S, "agents to connect"
            )
            coordinator = coord = MqttHub(
                HubConfig(
                    broker=BrokerConfig(
                        host="127.0.0.1", port=port, tls=False, username="coordinator"
                    ),
                    chunk_size=chunk_size,
                )
            )
            coord.start()
            wait_until(
                lambda: sum(r.online for r in coord.fleet()) == agents,
                STARTUP_TIMEOUT_S,
                "every agent's status at the coordinator",
            )
            sizes: Counter[str] = Counter()
            counts: Counter[str] = Counter()
            count_publishes(coord, sizes, counts)
            artifact = Artifact.load(artifact_path)
            monitor = SysMonitor(port)
            before = monitor.snapshot()

            past_download: dict[str, float] = {}
            first_seen: Counter[str] = Counter()

            def on_change(tracker: DeploymentTracker) -> None:
                for progress in tracker.progress():
                    if progress.state in PAST_DOWNLOAD and progress.device_id not in past_download:
                        past_download[progress.device_id] = progress.updated_at
                        first_seen[str(progress.state)] += 1

            start = time.time()
            deliveries = Deliveries(coord)
            delivery = deliveries.deploy(artifact, Target.parse("all"))
            returned = time.time()
            result = deliveries.wait(delivery, timeout=timeout, on_change=on_change)
            installed = [d for d in result.devices if d.state is DeviceState.INSTALLED]
            if len(installed) != agents:
                raise RuntimeError(f"only {len(installed)}/{agents} installed: {result.counts()}")
            installed_at = [d.updated_at - start for d in installed]
            past = [t - start for t in past_download.values()]
            after = monitor.snapshot()
            return FedgeRun(
                deploy_returned_s=returned - start,
                all_past_download_s=max(past),
                all_installed_s=max(installed_at),
                installed=len(installed),
                coordinator_bytes=dict(sizes),
                coordinator_messages=dict(counts),
                broker_bytes_received=after["received"] - before["received"],
                broker_bytes_sent=after["sent"] - before["sent"],
                first_seen_past_download=dict(first_seen),
                past_download_s_first_median=(min(past), statistics.median(past)),
                installed_s_first_median=(min(installed_at), statistics.median(installed_at)),
            )
        finally:
            if monitor is not None:
                monitor.stop()
            if coordinator is not None:
                coordinator.stop()
            for agent in fleet:
                agent.stop()


# --------------------------------------------------------------------------- raw paho


@dataclass
class RawRun:
    """One raw paho fan-out."""

    all_received_s: float
    publisher_bytes: int
    publisher_messages: int
    broker_bytes_received: int
    broker_bytes_sent: int
    received_s_first_median: tuple[float, float] = (0.0, 0.0)


def run_raw(workdir: Path, payload: bytes, subscribers: int, piece: int, timeout: float) -> RawRun:
    """One publisher, ``subscribers`` subscribers, the payload in ``piece``-byte messages."""
    pieces = [payload[i : i + piece] for i in range(0, len(payload), piece)]
    total = len(payload)
    lock = threading.Lock()
    received = [0] * subscribers
    remaining = [subscribers]
    completed: list[float] = []
    done = threading.Event()
    subscribed = threading.Semaphore(0)
    clients: list[mqtt.Client] = []
    monitor: SysMonitor | None = None

    def receiver(index: int) -> Callable[[Any, Any, mqtt.MQTTMessage], None]:
        def on_message(_client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
            with lock:
                received[index] += len(msg.payload)
                if received[index] == total:
                    completed.append(time.time())
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        return on_message

    with mosquitto(workdir / "broker", sys_interval=1, timeout=STARTUP_TIMEOUT_S) as port:
        try:
            for i in range(subscribers):
                client = paho_client(f"raw-sub-{i:03d}")
                client.on_message = receiver(i)
                client.on_connect = lambda c, *_args: c.subscribe(RAW_TOPIC, qos=1)
                client.on_subscribe = lambda *_args: subscribed.release()
                clients.append(client)
                client.connect("127.0.0.1", port)
                client.loop_start()
            for _ in range(subscribers):
                if not subscribed.acquire(timeout=STARTUP_TIMEOUT_S):
                    raise TimeoutError("raw subscribers did not subscribe")
            publisher = paho_client("raw-pub")
            clients.append(publisher)
            connected = threading.Event()
            publisher.on_connect = lambda *_args: connected.set()
            publisher.connect("127.0.0.1", port)
            publisher.loop_start()
            if not connected.wait(STARTUP_TIMEOUT_S):
                raise TimeoutError("raw publisher did not connect")
            monitor = SysMonitor(port)
            before = monitor.snapshot()
            start = time.time()
            for data in pieces:
                publisher.publish(RAW_TOPIC, data, qos=1)
            if not done.wait(timeout):
                raise TimeoutError(f"raw fan-out incomplete: {received}")
            finished = max(completed)
            after = monitor.snapshot()
            return RawRun(
                all_received_s=finished - start,
                publisher_bytes=sum(len(p) for p in pieces),
                publisher_messages=len(pieces),
                broker_bytes_received=after["received"] - before["received"],
                broker_bytes_sent=after["sent"] - before["sent"],
                received_s_first_median=(
                    min(completed) - start,
                    statistics.median(completed) - start,
                ),
            )
        finally:
            if monitor is not None:
                monitor.stop()
            for client in clients:
                stop_client(client)


# --------------------------------------------------------------------------- output


def median_of(runs: list[Any], name: str) -> float:
    """The median of one numeric field over the runs."""
    return float(statistics.median(getattr(r, name) for r in runs))


def format_table(summary: dict[str, Any], agents: int, repeats: int) -> str:
    """A plain-text table: fedge beside raw paho, medians."""
    raw = summary["raw_all_received_s"]
    median_raw = summary["raw_median_device_received_s"]
    title = f"{agents} devices, median of {repeats}"
    header = f"{title:<40} {'fedge':>10} {'raw paho':>10} {'fedge/raw':>10}"
    lines = [header, "-" * len(header)]
    for label, key in (
        ("deploy() returned (all accepted) s", "fedge_deploy_returned_s"),
        ("all past downloading s", "fedge_all_past_download_s"),
        ("all installed s", "fedge_all_installed_s"),
    ):
        value = summary[key]
        lines.append(f"{label:<40} {value:>10.3f} {raw:>10.3f} {value / raw:>9.2f}x")
    value = summary["fedge_median_device_installed_s"]
    label = "median device installed / received s"
    lines.append(f"{label:<40} {value:>10.3f} {median_raw:>10.3f} {value / median_raw:>9.2f}x")
    for label, key in (
        ("sender published, KiB", "publisher_bytes"),
        ("broker received (all clients), KiB", "broker_bytes_received"),
        ("broker sent (all clients), KiB", "broker_bytes_sent"),
    ):
        fedge, base = summary[f"fedge_{key}"], summary[f"raw_{key}"]
        lines.append(f"{label:<40} {fedge / KIB:>10.0f} {base / KIB:>10.0f} {fedge / base:>9.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--agents", type=int, default=50, help="devices (agents / subscribers)")
    parser.add_argument("--size-mib", type=float, default=1.0, help="target artifact payload")
    parser.add_argument(
        "--chunk-kib", type=int, default=64, help="fedge chunk and raw message size"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; medians reported")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per fan-out")
    parser.add_argument("--seed", type=int, default=0, help="weights seed")
    args = parser.parse_args(argv)
    if args.agents < 2 or args.size_mib <= 0 or not 1 <= args.chunk_kib <= 128:
        parser.error("need --agents >= 2, --size-mib > 0 and 1 <= --chunk-kib <= 128")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    chunk = args.chunk_kib * KIB

    workdir = Path(tempfile.mkdtemp(prefix="fedge-bench-fanout-"))
    fedge_runs: list[FedgeRun] = []
    raw_runs: list[RawRun] = []
    try:
        artifact_path, trust, hidden = build_artifact(
            workdir, round(args.size_mib * MIB), args.seed
        )
        payload = Artifact.load(artifact_path).payload
        print(
            f"artifact: MLP 64-{hidden}-{hidden}-10 int8, {len(payload)} payload bytes",
            file=sys.stderr,
        )
        for rep in range(args.repeats):
            rep_dir = workdir / f"fedge-{rep}"
            run = run_fedge(rep_dir, artifact_path, trust, args.agents, chunk, args.timeout)
            shutil.rmtree(rep_dir, ignore_errors=True)
            fedge_runs.append(run)
            print(
                f"fedge {rep + 1}/{args.repeats}: installed in {run.all_installed_s:.3f}s",
                file=sys.stderr,
            )
            rep_dir = workdir / f"raw-{rep}"
            raw = run_raw(rep_dir, payload, args.agents, chunk, args.timeout)
            shutil.rmtree(rep_dir, ignore_errors=True)
            raw_runs.append(raw)
            print(
                f"raw   {rep + 1}/{args.repeats}: received in {raw.all_received_s:.3f}s",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary: dict[str, Any] = {
        "fedge_deploy_returned_s": median_of(fedge_runs, "deploy_returned_s"),
        "fedge_all_past_download_s": median_of(fedge_runs, "all_past_download_s"),
        "fedge_all_installed_s": median_of(fedge_runs, "all_installed_s"),
        "raw_all_received_s": median_of(raw_runs, "all_received_s"),
        "fedge_publisher_bytes": statistics.median(
            sum(r.coordinator_bytes.values()) for r in fedge_runs
        ),
        "raw_publisher_bytes": median_of(raw_runs, "publisher_bytes"),
        "fedge_broker_bytes_received": median_of(fedge_runs, "broker_bytes_received"),
        "raw_broker_bytes_received": median_of(raw_runs, "broker_bytes_received"),
        "fedge_broker_bytes_sent": median_of(fedge_runs, "broker_bytes_sent"),
        "raw_broker_bytes_sent": median_of(raw_runs, "broker_bytes_sent"),
    }
    summary["fedge_median_device_installed_s"] = statistics.median(
        r.installed_s_first_median[1] for r in fedge_runs
    )
    summary["raw_median_device_received_s"] = statistics.median(
        r.received_s_first_median[1] for r in raw_runs
    )
    raw_s = summary["raw_all_received_s"]
    summary["ratio_installed_over_raw"] = round(summary["fedge_all_installed_s"] / raw_s, 3)
    summary["ratio_past_download_over_raw"] = round(summary["fedge_all_past_download_s"] / raw_s, 3)
    print(format_table(summary, args.agents, args.repeats))
    result = {
        "benchmark": "ota_fanout",
        "artifact": {
            "model": f"MLP 64-{hidden}-{hidden}-10, He-initialised, int8 dynamic",
            "payload_bytes": len(payload),
            "chunk_bytes": chunk,
            "chunks": math.ceil(len(payload) / chunk),
        },
        "settings": {
            "agents": args.agents,
            "size_mib": args.size_mib,
            "repeats": args.repeats,
            "timeout_s": args.timeout,
            "seed": args.seed,
            "statistic": f"median over {args.repeats} runs, per figure",
            "fedge": "in-process agents (default config), Deliveries.deploy to Target 'all'; "
            "times from just before deploy(); past downloading = first verifying/installing/"
            "installed report seen via wait(on_change), coordinator's updated_at",
            "raw": "one paho publisher, QoS 1, one topic; subscribers QoS 1 in-process; "
            "time until every subscriber has every byte",
            "bytes": "sender published = MQTT payload bytes; broker received/sent = "
            "$SYS/broker/bytes deltas over the measurement (all clients, MQTT framing)",
            "broker": "mosquitto, anonymous, 127.0.0.1, no ACL, persistence off, fresh per run",
        },
        "summary": summary,
        "runs": {
            "fedge": [asdict(r) for r in fedge_runs],
            "raw": [asdict(r) for r in raw_runs],
        },
        "environment": environment(("fedge", "numpy", "onnxruntime", "paho-mqtt")),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
