"""Benchmark: ``fedge simulate`` at scale against a local mosquitto.

Starts mosquitto (anonymous, 127.0.0.1, persistence off) and runs
:func:`coordinator.sim.simulate.run_simulation` with ``--agents`` in-process agents (each
a real :class:`edge_agent.agent.Agent`: its own MQTT connection, worker thread and
data directory; the connections share one epoll network thread per 250 agents),
``--rounds`` rounds of FedAvg on the synthetic dataset, then the canary-first
rollout of the packaged model to every agent.

Reported: setup time (agents connected and announced), seconds per round, rollout
time, agents serving the new model, and memory: the peak RSS of this process (the
coordinator and every agent share it) before and after the agents start, per agent,
and mosquitto's RSS. Prints a table and writes JSON::

    python benchmarks/simulate_scale.py --agents 1000 --rounds 3 \\
        --out benchmarks/results/simulate_scale.json
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _support import argument_parser, environment, mosquitto, proc_memory_kib, write_json

from coordinator.sim.simulate import SimulationConfig, run_simulation

DEFAULT_OUT = Path(__file__).parent / "results" / "simulate_scale.json"


def _mosquitto_pid() -> int | None:
    """The mosquitto this process started (a child named mosquitto)."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("Name", "").strip() == "mosquitto" and fields.get("PPid", "").strip() == me:
            return int(entry.name)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="synthetic:20000,32,10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one socket per agent
    before = proc_memory_kib()["VmRSS"]
    with tempfile.TemporaryDirectory(prefix="fedge-scale-") as tmp:
        root = Path(tmp)
        with mosquitto(root / "broker", timeout=10) as port:
            broker_pid = _mosquitto_pid()
            config = SimulationConfig(
                out=root / "run", agents=args.agents, rounds=args.rounds, dataset=args.dataset,
                partition="iid", broker=f"mqtt://127.0.0.1:{port}", round_timeout_s=120.0,
            )  # fmt: skip
            started = time.monotonic()

            def show(kind: str, data: dict[str, Any]) -> None:
                if kind == "phase":
                    print(f"{time.monotonic() - started:7.1f}s {data['name']}", file=sys.stderr)

            def show_round(report: Any, what: str) -> None:
                if what == "done":
                    print(f"{time.monotonic() - started:7.1f}s round {report.round}: "
                          f"{report.status} {report.clients}/{report.sampled} "
                          f"{report.seconds:.1f}s", file=sys.stderr)  # fmt: skip

            report = run_simulation(config, on_event=show, on_round=show_round).to_json()
            broker_rss = proc_memory_kib(broker_pid)["VmRSS"] if broker_pid else None
    peak = proc_memory_kib()["VmHWM"]
    rows: dict[str, Any] = {
        "agents": args.agents,
        "rounds": args.rounds,
        "rounds_ok": report["rounds_ok"],
        "setup_s": report["timings"]["setup_s"],
        "seconds_per_round": report["seconds_per_round"],
        "rollout_s": report["timings"]["rollout_s"],
        "agents_updated": report["rollout"]["agents_updated"],
        "final_accuracy": report["final_accuracy"],
        "process_rss_before_kib": before,
        "process_peak_rss_kib": peak,
        "peak_rss_per_agent_kib": (peak - before) / args.agents,
        "mosquitto_rss_kib": broker_rss,
    }
    for key, value in rows.items():
        print(f"{key:<24} {value}")
    result = {
        "benchmark": "simulate_scale",
        "dataset": args.dataset,
        "result": rows,
        "rounds": report["rounds"],
        "rollout": report["rollout"],
        "environment": environment(["fedge", "flwr", "paho-mqtt", "numpy"]),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
