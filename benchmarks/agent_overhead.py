"""Benchmark: what the fedge agent costs in memory and latency over bare onnxruntime.

Builds a realistic artifact: the digits MLP 64-512-512-10 (scikit-learn, as in
``benchmarks/quantization.py``), exported to ONNX, quantized to int8 (static, calibrated
on training rows) and signed with a throwaway key by
:func:`coordinator.delivery.packaging.package_model`. Then, in one run:

* **memory**: a real ``fedge-agent run`` process (``python -m edge_agent.cli run``,
  local HTTP endpoint on) connects to a mosquitto broker (loopback, the shipped ACL,
  passwords), gets the artifact from a :class:`coordinator.link.hub.MqttHub`,
  installs it and answers ``--requests`` predictions over ``POST /v1/predict``; its
  ``VmRSS`` / ``VmHWM`` are read from ``/proc/<pid>/status``. The baseline is a bare
  python process that imports onnxruntime, loads the same model bytes into an
  ``InferenceSession`` with the same options and runs the same rows, measured the same
  way;
* **latency**: an in-process :class:`edge_agent.agent.Agent` started on the data
  directory the agent process installed into (it restores the model from it, and
  connects to the same broker), ``Agent.predict`` at batch 1 against
  ``InferenceSession.run`` on the same model bytes, same rows, same session options
  (1 intra-op thread, 1 inter-op thread, sequential: what
  :mod:`edge_agent.runtime.onnx_runtime` uses). The agent's own runtime adapter
  (``OnnxRuntimeModel.run``, no serving layer) is timed as a middle column. The three
  calls are interleaved per iteration (rotating order) after a warm-up.

Every process and broker started is stopped, and the temporary directory removed, on
the way out. Prints two tables and writes JSON::

    python benchmarks/agent_overhead.py --out benchmarks/results/agent_overhead.json
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime
from _support import (
    argument_parser,
    environment,
    free_port,
    mosquitto,
    password,
    proc_memory_kib,
    ready_process_memory,
    stop_process,
    wait_until,
    write_json,
)

from compress.families import INPUT_NAME
from compress.keys import generate_signing_key, save_keypair
from compress.onnx_export import export_onnx
from coordinator.delivery.deliveries import Artifact, Deliveries
from coordinator.delivery.packaging import LabelledData, PackageRequest, package_model
from coordinator.delivery.tracker import DeviceState
from coordinator.link.fleet import Target
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.sim.datasets import load_digits_split, train_reference_mlp
from edge_agent.agent import Agent
from edge_agent.config.agent import AgentConfig, BrokerConfig, TrustConfig

DEFAULT_OUT = Path("benchmarks/results/agent_overhead.json")
DEVICE_ID = "bench-agent"
COORDINATOR_USER = "coordinator"
MIB = 1024 * 1024
STARTUP_TIMEOUT_S = 30.0
THREADS = 1
"""onnxruntime intra-op threads: what the agent loads models with (not configurable)."""

# The bare baseline process: imports onnxruntime (and numpy, which it needs anyway),
# loads the model with the options edge_agent.runtime.onnx_runtime uses, runs the rows
# one at a time, says "ready" and waits for stdin to close.
BARE_SCRIPT = """\
import sys
import numpy as np
import onnxruntime as ort
model = open(sys.argv[1], "rb").read()
rows = np.load(sys.argv[2])
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[3])
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
options.log_severity_level = 4
session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
for row in rows:
    session.run(None, {name: row[np.newaxis, :]})
print("ready", flush=True)
sys.stdin.read()
"""


# --------------------------------------------------------------------------- helpers


def broker_config(port: int, user: str) -> BrokerConfig:
    """Connection settings for ``user`` on the benchmark broker."""
    return BrokerConfig(
        host="127.0.0.1",
        port=port,
        tls=False,
        username=user,
        password=password(user),
        reconnect_min_s=1.0,
        reconnect_max_s=2.0,
    )


def session_options(threads: int) -> onnxruntime.SessionOptions:
    """The options edge_agent.runtime.onnx_runtime.OnnxRuntimeModel.from_bytes sets."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4
    return options


def stats_us(values: list[float]) -> dict[str, float]:
    """p50, p95 and mean of microsecond samples."""
    return {
        "p50": round(statistics.median(values), 2),
        "p95": round(statistics.quantiles(values, n=20)[-1], 2),
        "mean": round(statistics.fmean(values), 2),
    }


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Model:
    """The signed artifact and what the measurements need from it."""

    artifact: Path
    public_key: Path
    payload: bytes
    rows: npt.NDArray[np.float32]
    fp32_bytes: int
    int8_accuracy: float | None


def build_model(directory: Path, seed: int) -> Model:
    """Train the digits MLP, export, quantize to int8, sign with a throwaway key."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    print("training the digits MLP 64-512-512-10...", file=sys.stderr)
    weights = train_reference_mlp(x_train, y_train, seed=seed)
    onnx_path = directory / "digits.onnx"
    onnx_path.write_bytes(export_onnx("mlp", weights))
    key = generate_signing_key()
    _private, public = save_keypair(key, directory / "keys")
    out = directory / "digits-v1.fedge"
    result = package_model(
        PackageRequest(
            model_path=onnx_path,
            name="digits",
            version=1,
            keys=[key],
            out=out,
            quantize="int8",
            calibration=x_train[:256],
            evaluation=LabelledData(x_test, y_test),
            expires_in=timedelta(days=1),
        ),
        now=datetime.now(UTC),
    )
    artifact = Artifact.load(out)
    if not artifact.payload_matches:
        raise RuntimeError("the artifact's payload does not match its manifest")
    return Model(
        artifact=out,
        public_key=public,
        payload=artifact.payload,
        rows=x_test,
        fp32_bytes=result.fp32_bytes,
        int8_accuracy=result.packaged_accuracy,
    )


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryResult:
    """RSS of the agent process and of the bare baseline, KiB."""

    agent_rss_kib: int
    agent_hwm_kib: int
    bare_rss_kib: int
    bare_hwm_kib: int
    requests: int
    http_correct: int
    deploy_seconds: float


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST JSON, return the decoded answer."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def measure_agent_process(
    model: Model, port: int, workdir: Path, data_dir: Path, requests: int
) -> tuple[dict[str, int], int, float]:
    """Run ``fedge-agent run``, deploy to it, serve predictions over HTTP, read its RSS.

    Returns:
        The agent's memory figures, correct HTTP answers, and deploy-to-installed seconds.
    """
    secret = workdir / f"{DEVICE_ID}.password"
    secret.write_text(password(DEVICE_ID))
    http_port = free_port()
    log = workdir / "agent.log"
    args = [
        sys.executable, "-m", "edge_agent.cli", "run",
        "--device-id", DEVICE_ID, "--broker", f"mqtt://127.0.0.1:{port}",
        "--password-file", str(secret), "--trust", str(model.public_key),
        "--data-dir", str(data_dir), "--http", f"127.0.0.1:{http_port}",
    ]  # fmt: skip
    with log.open("ab") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    coordinator = MqttHub(HubConfig(broker=broker_config(port, COORDINATOR_USER)))
    deliveries = Deliveries(coordinator, accept_wait_s=5.0)
    try:
        coordinator.start()

        def online() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the agent exited: {log.read_text()[-2000:]}")
            return any(r.device_id == DEVICE_ID and r.online for r in coordinator.fleet())

        wait_until(online, STARTUP_TIMEOUT_S, "the agent to come online")
        start = time.perf_counter()
        delivery = deliveries.deploy(Artifact.load(model.artifact), Target.parse("all"))
        result = deliveries.wait(delivery, timeout=60)
        deploy_seconds = time.perf_counter() - start
        states = {d.device_id: d.state for d in result.devices}
        if states.get(DEVICE_ID) is not DeviceState.INSTALLED:
            raise RuntimeError(f"deploy did not install: {result.to_json()}")
        url = f"http://127.0.0.1:{http_port}/v1/predict"
        correct = 0
        labels = np.argmax(
            _bare_session(model.payload, THREADS).run(None, {INPUT_NAME: model.rows})[0], axis=1
        )
        for i in range(requests):
            row = model.rows[i % len(model.rows)]
            answer = post_json(url, {"inputs": [row.tolist()]})
            correct += int(answer["labels"][0] == labels[i % len(model.rows)])
        memory = proc_memory_kib(process.pid)
        return memory, correct, deploy_seconds
    finally:
        coordinator.stop()
        stop_process(process)


def measure_bare_process(
    model: Model, workdir: Path, requests: int, threads: int
) -> dict[str, int]:
    """RSS of a python process that only loads the model into onnxruntime and runs it."""
    model_path = workdir / "payload.onnx"
    model_path.write_bytes(model.payload)
    rows_path = workdir / "rows.npy"
    rows = np.resize(model.rows, (requests, model.rows.shape[1])).astype(np.float32)
    np.save(rows_path, rows)
    return ready_process_memory(
        BARE_SCRIPT, [str(model_path), str(rows_path), str(threads)], "bare onnxruntime process"
    )


# --------------------------------------------------------------------------- latency


def _bare_session(payload: bytes, threads: int) -> Any:
    return onnxruntime.InferenceSession(
        payload, sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )


def measure_latency(
    model: Model, port: int, data_dir: Path, *, runs: int, warmup: int, threads: int
) -> dict[str, dict[str, float]]:
    """Interleaved batch-1 timings: Agent.predict, the adapter's run, bare session.run."""
    config = AgentConfig(
        device_id=DEVICE_ID,
        broker=broker_config(port, DEVICE_ID),
        data_dir=data_dir,
        trust=TrustConfig(keys=(model.public_key,)),
    )
    agent = Agent(config)
    agent.start()
    try:
        wait_until(lambda: agent.connected, STARTUP_TIMEOUT_S, "the in-process agent to connect")
        loaded = agent.model
        if loaded is None or loaded.sha256 != Artifact.load(model.artifact).transfer_id:
            raise RuntimeError("the in-process agent did not restore the installed model")
        session = _bare_session(model.payload, threads)
        adapter = loaded.runtime
        rows = [model.rows[i % len(model.rows)][np.newaxis, :].copy() for i in range(runs)]
        expected = session.run(None, {INPUT_NAME: rows[0]})[0]
        got = agent.predict(rows[0]).outputs
        if not np.allclose(next(iter(got.values())), expected):
            raise RuntimeError("agent and bare onnxruntime disagree on the same input")

        calls: dict[str, Callable[[npt.NDArray[np.float32]], object]] = {
            "agent": agent.predict,
            "adapter": lambda x: adapter.run({INPUT_NAME: x}),
            "bare": lambda x: session.run(None, {INPUT_NAME: x}),
        }
        names = list(calls)
        for i in range(warmup):
            for name in names:
                calls[name](rows[i % len(rows)])
        times: dict[str, list[float]] = {name: [] for name in names}
        clock = time.perf_counter
        for i, row in enumerate(rows):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                call = calls[name]
                start = clock()
                call(row)
                times[name].append((clock() - start) * 1e6)
        return {name: stats_us(values) for name, values in times.items()}
    finally:
        agent.stop()


# --------------------------------------------------------------------------- output


def ratio(a: float, b: float) -> float:
    """a / b, rounded."""
    return round(a / b, 3) if b else float("nan")


def format_tables(memory: MemoryResult, latency: dict[str, dict[str, float]]) -> str:
    """Two plain-text tables: memory and latency, fedge beside the baseline."""
    lines = []
    header = f"{'memory (MiB)':<14} {'fedge agent':>12} {'bare ort':>10} {'diff':>9} {'ratio':>7}"
    lines += [header, "-" * len(header)]
    for label, agent_kib, bare_kib in (
        ("VmRSS", memory.agent_rss_kib, memory.bare_rss_kib),
        ("VmHWM (peak)", memory.agent_hwm_kib, memory.bare_hwm_kib),
    ):
        lines.append(
            f"{label:<14} {agent_kib / 1024:>12.1f} {bare_kib / 1024:>10.1f} "
            f"{(agent_kib - bare_kib) / 1024:>+9.1f} {agent_kib / bare_kib:>6.2f}x"
        )
    lines.append("")
    header = (
        f"{'batch-1 (us)':<14} {'Agent.predict':>14} {'adapter.run':>12} "
        f"{'bare run':>10} {'agent/bare':>11} {'adapter/bare':>13}"
    )
    lines += [header, "-" * len(header)]
    for stat in ("p50", "p95", "mean"):
        agent, adapter, bare = (latency[k][stat] for k in ("agent", "adapter", "bare"))
        lines.append(
            f"{stat:<14} {agent:>14.1f} {adapter:>12.1f} {bare:>10.1f} "
            f"{agent / bare:>10.2f}x {adapter / bare:>12.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--runs", type=int, default=2000, help="timed batch-1 calls per side")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per side first")
    parser.add_argument(
        "--requests", type=int, default=200, help="HTTP predictions before reading the RSS"
    )
    args = parser.parse_args(argv)
    if args.runs < 20 or args.warmup < 0 or args.requests < 1:
        parser.error("need --runs >= 20, --warmup >= 0 and --requests >= 1")

    workdir = Path(tempfile.mkdtemp(prefix="fedge-bench-agent-"))
    try:
        model = build_model(workdir, args.seed)
        data_dir = workdir / "agent-data"
        with mosquitto(
            workdir / "broker", users=[COORDINATOR_USER, DEVICE_ID], timeout=STARTUP_TIMEOUT_S
        ) as port:
            print("agent process: deploy, serve, measure RSS...", file=sys.stderr)
            agent_mem, correct, deploy_seconds = measure_agent_process(
                model, port, workdir, data_dir, args.requests
            )
            print("bare onnxruntime process...", file=sys.stderr)
            bare_mem = measure_bare_process(model, workdir, args.requests, THREADS)
            print(f"latency: {args.runs} interleaved batch-1 calls...", file=sys.stderr)
            latency = measure_latency(
                model, port, data_dir, runs=args.runs, warmup=args.warmup, threads=THREADS
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    memory = MemoryResult(
        agent_rss_kib=agent_mem["VmRSS"],
        agent_hwm_kib=agent_mem["VmHWM"],
        bare_rss_kib=bare_mem["VmRSS"],
        bare_hwm_kib=bare_mem["VmHWM"],
        requests=args.requests,
        http_correct=correct,
        deploy_seconds=round(deploy_seconds, 3),
    )
    print(format_tables(memory, latency))
    result = {
        "benchmark": "agent_overhead",
        "model": {
            "name": "digits MLP 64-512-512-10, int8 static (package_model)",
            "fp32_bytes": model.fp32_bytes,
            "int8_bytes": len(model.payload),
            "int8_accuracy": model.int8_accuracy,
        },
        "settings": {
            "runs": args.runs,
            "warmup": args.warmup,
            "requests": args.requests,
            "threads": THREADS,
            "seed": args.seed,
            "memory": "VmRSS/VmHWM from /proc/<pid>/status after the HTTP predictions; "
            "baseline: python importing onnxruntime, InferenceSession on the same bytes, "
            "same rows",
            "latency": "batch 1, microseconds; Agent.predict vs the agent's adapter "
            "(OnnxRuntimeModel.run) vs bare InferenceSession.run, interleaved per iteration, "
            "session options of edge_agent.runtime.onnx_runtime (intra 1, inter 1, "
            "sequential)",
        },
        "memory": {
            **asdict(memory),
            "diff_kib": memory.agent_rss_kib - memory.bare_rss_kib,
            "rss_ratio": ratio(memory.agent_rss_kib, memory.bare_rss_kib),
        },
        "latency_us": latency,
        "latency_ratio_agent_over_bare": {
            stat: ratio(latency["agent"][stat], latency["bare"][stat])
            for stat in ("p50", "p95", "mean")
        },
        "latency_ratio_adapter_over_bare": {
            stat: ratio(latency["adapter"][stat], latency["bare"][stat])
            for stat in ("p50", "p95", "mean")
        },
        "environment": environment(("fedge", "numpy", "onnxruntime", "paho-mqtt", "scikit-learn")),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
