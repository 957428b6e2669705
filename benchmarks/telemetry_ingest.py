"""Benchmark: the coordinator service under a fleet's telemetry, and its API meanwhile.

Three processes, as in production: mosquitto (anonymous, loopback); the service
(``fedge coordinator serve``, its own process, SQLite in a temporary directory);
and this one, which runs ``--agents`` real in-process agents that each publish a
telemetry window every ``--interval`` seconds. A fourth process probes the HTTP
API (``GET /v1/devices``, ``GET /v1/devices/{id}/telemetry``, ``GET /metrics``, in
turn, one request after another) and records each request's latency.

1. Start everything; wait until the service lists every agent online.
2. **Load**: for ``--seconds`` seconds the agents publish and the prober probes.
3. Stop the agents. *Sent* is the number of telemetry windows the broker
   acknowledged to the agents (``Agent.telemetry_published``, every window since
   they started); *ingested* is what the service stored
   (``fedge_telemetry_ingested`` on ``/metrics``, cross-checked by counting the
   rows in its database after it stopped). They must be equal.
4. **Baseline**: the prober runs again for ``--idle-seconds`` with the same
   database and no telemetry arriving, for the side-by-side latency figures.

Prints a table and writes JSON::

    python benchmarks/telemetry_ingest.py --agents 500 --seconds 60 \\
        --out benchmarks/results/telemetry_ingest.json
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
from _support import argument_parser, environment, free_port, mosquitto, stop_process, write_json

from compress.keys import generate_signing_key, save_keypair
from coordinator.sim.local_fleet import LocalFleet
from edge_agent.config.agent import BrokerConfig

DEFAULT_OUT = Path(__file__).parent / "results" / "telemetry_ingest.json"
PROBES = ("/v1/devices", "/v1/devices/{device}/telemetry?limit=10", "/metrics")


def _fedge(*args: str) -> list[str]:
    """The ``fedge`` console script installed beside this interpreter."""
    return [str(Path(sys.executable).parent / "fedge"), *args]


def _probe(base: str, token: str, device: str, seconds: float, out: Connection) -> None:
    """Child process: request the probes in turn for ``seconds``; send back latencies."""
    latencies: dict[str, list[float]] = {path: [] for path in PROBES}
    errors = 0
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base, headers=headers, timeout=30.0) as client:
        while time.monotonic() < deadline:
            for path in PROBES:
                start = time.perf_counter()
                try:
                    response = client.get(path.format(device=device))
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = (time.perf_counter() - start) * 1000.0
                if ok:
                    latencies[path].append(elapsed)
                else:
                    errors += 1
    out.send((latencies, errors))
    out.close()


def _probe_for(base: str, token: str, device: str, seconds: float) -> dict[str, Any]:
    """Probe the API from a separate process for ``seconds``; the latency summary."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(
        target=_probe, args=(base, token, device, seconds, sender), daemon=True
    )
    process.start()
    latencies, errors = receiver.recv()
    process.join(timeout=30)
    return _latency_summary(latencies, errors)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _latency_summary(latencies: dict[str, list[float]], errors: int) -> dict[str, Any]:
    everything = [v for values in latencies.values() for v in values]
    summary: dict[str, Any] = {
        "requests": len(everything),
        "errors": errors,
        "p50_ms": round(_quantile(everything, 0.5), 2),
        "p95_ms": round(_quantile(everything, 0.95), 2),
        "p99_ms": round(_quantile(everything, 0.99), 2),
        "max_ms": round(max(everything, default=float("nan")), 2),
    }
    summary["per_route"] = {
        path: {
            "requests": len(v),
            "p50_ms": round(_quantile(v, 0.5), 2),
            "p99_ms": round(_quantile(v, 0.99), 2),
        }
        for path, v in latencies.items()
    }
    return summary


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise RuntimeError(f"{name} not on /metrics")


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--interval", type=float, default=1.0, help="Telemetry interval, s.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))  # mosquitto inherits

    work = Path(tempfile.mkdtemp(prefix="fedge-ingest-"))
    try:
        with mosquitto(work / "broker", timeout=15.0) as port:
            db = work / "service" / "coordinator.db"
            _private, public = save_keypair(generate_signing_key(), work / "keys")
            token = subprocess.run(
                _fedge("coordinator", "token", "create", "--role", "viewer", "--db", str(db)),
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]  # fmt: skip
            api_port = free_port()
            base = f"http://127.0.0.1:{api_port}"
            log = (work / "service.log").open("wb")
            service = subprocess.Popen(
                _fedge(
                    "coordinator",
                    "serve",
                    "--db",
                    str(db),
                    "--bind",
                    f"127.0.0.1:{api_port}",
                    "--broker",
                    f"mqtt://127.0.0.1:{port}",
                    "--trust",
                    str(public),
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"})
            try:
                _wait(lambda: _healthy(client), 30.0, "the service")
                started = time.monotonic()
                fleet = LocalFleet.start(
                    [None] * args.agents,
                    broker_for=lambda d: BrokerConfig.from_url(
                        f"mqtt://127.0.0.1:{port}", username=d
                    ),
                    trust=[public], root=work / "agents", prefix="tm",
                    telemetry_interval_s=args.interval,
                )  # fmt: skip
                try:
                    _wait(lambda: _metric(client, "fedge_devices_online") >= args.agents,
                          120.0, "every agent online")  # fmt: skip
                    setup_s = time.monotonic() - started
                    before = sum(agent.telemetry_published for agent in fleet.agents)
                    load_started = time.monotonic()
                    load_latency = _probe_for(base, token, "tm00", args.seconds)
                    load_s = time.monotonic() - load_started
                    during = sum(agent.telemetry_published for agent in fleet.agents) - before
                finally:
                    fleet.stop()
                sent = sum(agent.telemetry_published for agent in fleet.agents)
                try:
                    _wait(lambda: _metric(client, "fedge_telemetry_ingested") >= sent, 60.0,
                          "the service to store every window")  # fmt: skip
                except RuntimeError as exc:
                    print(f"warning: {exc}", file=sys.stderr)
                ingested = int(_metric(client, "fedge_telemetry_ingested"))
                idle_latency = _probe_for(base, token, "tm00", args.idle_seconds)
                service_rss_kib = _rss_kib(service.pid)
            finally:
                client.close()
                service.terminate()
                try:
                    service.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    stop_process(service)
                log.close()
            with sqlite3.connect(db) as conn:
                stored_rows = int(conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "agents": args.agents,
        "seconds": args.seconds,
        "interval_s": args.interval,
        "setup_s": round(setup_s, 1),
        "windows_sent": sent,
        "windows_sent_during_load": during,
        "load_rate_per_s": round(during / load_s, 1),
        "offered_rate_per_s": round(args.agents / args.interval, 1),
        "windows_ingested": ingested,
        "rows_in_database": stored_rows,
        "missing": sent - stored_rows,
        "api_under_load": load_latency,
        "api_idle": idle_latency,
        "service_rss_mib": round(service_rss_kib / 1024, 1),
        "service_exit_status": service.returncode,
        "environment": environment(["fastapi", "uvicorn", "paho-mqtt"]),
    }
    _print(result)
    write_json(args.out, result)
    return 0 if sent == stored_rows and service.returncode == 0 else 1


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/v1/health").status_code == 200
    except httpx.HTTPError:
        return False


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _print(result: dict[str, Any]) -> None:
    load, idle = result["api_under_load"], result["api_idle"]
    print(f"\n{result['agents']} agents, a telemetry window each every {result['interval_s']} s "
          f"for {result['seconds']:.0f} s (setup {result['setup_s']} s)")  # fmt: skip
    print(f"  windows sent during the load: {result['windows_sent_during_load']} "
          f"({result['load_rate_per_s']}/s; the agents' schedule asks "
          f"{result['offered_rate_per_s']}/s)")  # fmt: skip
    print(f"  windows sent (acknowledged by the broker): {result['windows_sent']}")
    print(f"  windows ingested (service counter):        {result['windows_ingested']}")
    print(f"  rows in the service's database:            {result['rows_in_database']}")
    print(f"  missing:                                   {result['missing']}")
    print(f"  service peak RSS: {result['service_rss_mib']} MiB; "
          f"exit status after SIGTERM: {result['service_exit_status']}")  # fmt: skip
    print("\n  API latency, ms     under load    idle (baseline)")
    for key in ("requests", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms"):
        print(f"  {key:<18} {load[key]:>12} {idle[key]:>14}")


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
    sys.exit(main())
