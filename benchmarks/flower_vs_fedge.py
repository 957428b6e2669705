"""Benchmark: fedge simulate against Flower's own simulation on the identical workload.

For each client count in ``--clients`` (default 10, 100, 1000), the same workload
runs twice, one after the other:

* **fedge**: :func:`coordinator.sim.simulate.run_simulation` through a real mosquitto
  (127.0.0.1, anonymous): one real agent per client, each with its own MQTT
  connection and data directory, weights broadcast once per round, updates back over
  MQTT (fp32), FedAvg via Flower's strategy through fedge's MqttGrid.
* **Flower**: ``flwr.simulation.run_simulation`` (Ray backend, one CPU per client
  actor) with a ``ServerApp`` running Flower's ``FedAvg.start`` and a ``ClientApp``
  that trains with the very same numpy trainer, data shard and held-out split as
  the fedge agent, in a separate process.

Identical on both sides: the dataset (``--dataset``, split 70/30, seeded), the
partition of the 70 % over the clients (``--partition``, seeded, written once as
``shard<i>/local.npz``), the model (MLP features-64-classes, same initial weights),
every client in every round, local training (``--epochs``, lr 0.05, batch 16, seeded
per round and client), ``--rounds`` rounds, and evaluation of the global model on the
30 % after each round. Reported per client count and side: wall time per round
(fedge: the round's duration including its evaluation; Flower: time between
successive evaluations), final accuracy, and the ratio fedge/Flower. A side that
fails or exceeds ``--timeout`` seconds is reported as "did not finish" with the
reason. Prints a table, writes JSON and regenerates ``docs/benchmarks.md``::

    python benchmarks/flower_vs_fedge.py --out benchmarks/results/flower_vs_fedge.json
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _support import argument_parser, environment, mosquitto, timestamp, write_json
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation as flower_simulation

from compress.families import init_weights
from coordinator.delivery.packaging import LabelledData
from coordinator.federated.runs import evaluate_weights
from coordinator.sim.fleet_data import load_dataset
from coordinator.sim.fleet_data import partition as split
from coordinator.sim.local_fleet import save_shards
from coordinator.sim.simulate import SimulationConfig, run_simulation
from edge_agent.training.data import LocalData
from edge_agent.training.numpy_trainers import trainer_for
from edge_agent.training.trainer import TrainConfig

DEFAULT_OUT = Path(__file__).parent / "results" / "flower_vs_fedge.json"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HIDDEN = 64
TRAIN = {"epochs": 1, "lr": 0.05, "batch_size": 16, "seed": 0}
HOLDOUT = 0.2


# ------------------------------------------------------------------ Flower side


def flower_worker(shards_dir: Path, clients: int, rounds: int, seed: int) -> dict[str, Any]:
    """Run Flower's simulation in this process; return its figures."""

    test = np.load(shards_dir / "test.npz")
    test_set = LabelledData(test["x"].astype(np.float32), test["y"].astype(np.int64))
    features = int(test_set.x.shape[1])
    classes = int(np.load(shards_dir / "classes.npy"))
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:  # Flower's signature
        index = int(context.node_config["partition-id"])
        weights = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        server_round = int(msg.content["config"]["server-round"])
        config = TrainConfig.from_mapping({**TRAIN, "server_round": server_round})
        data, _held_out = LocalData(shards_dir / f"shard{index}").split(HOLDOUT, seed=config.seed)
        rng = config.rng(f"r{server_round}", f"sim{index:02d}")  # as agent sim<NN> seeds it
        fitted = trainer_for("mlp").fit(weights, data, config, rng)
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: _array(v) for k, v in fitted.weights.items()}),
                "metrics": MetricRecord({"num-examples": fitted.num_examples}),
            }
        )
        return Message(content, reply_to=msg)

    marks: list[float] = []
    accuracies: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, _context: Context) -> None:
        weights = init_weights("mlp", [features, HIDDEN, classes], np.random.default_rng(seed))
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
            min_available_nodes=clients,
        )  # fmt: skip

        def evaluate(_round: int, arrays: ArrayRecord) -> MetricRecord:
            trained = {k: v.numpy() for k, v in arrays.items()}
            accuracy, loss = evaluate_weights("mlp", trained, test_set)
            marks.append(time.monotonic())
            accuracies.append(accuracy)
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        strategy.start(grid=grid, initial_arrays=ArrayRecord(
            {k: _array(v) for k, v in weights.items()}), num_rounds=rounds,
            evaluate_fn=evaluate)  # fmt: skip

    started = time.monotonic()
    flower_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    per_round = [b - a for a, b in itertools.pairwise(marks)]
    return {
        "seconds_per_round": statistics.mean(per_round) if per_round else None,
        "round_seconds": per_round,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "total_s": time.monotonic() - started,
    }


def _array(value: Any) -> Any:
    return Array(np.ascontiguousarray(value))


def run_flower(
    shards_dir: Path, clients: int, rounds: int, seed: int, timeout: float
) -> dict[str, Any]:
    """Flower's simulation in a child process (Ray stays out of this one)."""
    command = [sys.executable, __file__, "--flower-worker", str(shards_dir), str(clients),
               str(rounds), str(seed)]  # fmt: skip
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"did_not_finish": f"exceeded {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"did_not_finish": f"exit {out.returncode}: {' | '.join(tail)[:300]}"}
    return dict(json.loads(lines[-1]))


# ------------------------------------------------------------------- fedge side


def run_fedge(
    dataset: str,
    partition: str,
    clients: int,
    rounds: int,
    seed: int,
    url: str,
    root: Path,
    timeout: float,
) -> dict[str, Any]:
    """fedge simulate through the broker at ``url``."""
    started = time.monotonic()
    try:
        config = SimulationConfig(
            out=root / f"fedge-{clients}", agents=clients, rounds=rounds, dataset=dataset,
            partition=partition, broker=url, seed=seed, hidden=HIDDEN, epochs=TRAIN["epochs"],
            lr=TRAIN["lr"], batch_size=TRAIN["batch_size"], round_timeout_s=timeout,
        )  # fmt: skip
        report = run_simulation(config).to_json()
    except Exception as exc:  # noqa: BLE001 - reported as "did not finish"
        return {"did_not_finish": f"{type(exc).__name__}: {exc}"[:300]}
    return {
        "seconds_per_round": report["seconds_per_round"],
        "round_seconds": [r["seconds"] for r in report["rounds"]],
        "final_accuracy": report["final_accuracy"],
        "rounds_ok": report["rounds_ok"],
        "agents_updated": report["rollout"]["agents_updated"],
        "total_s": time.monotonic() - started,
    }


def write_shards(dataset: str, partition: str, clients: int, seed: int, directory: Path) -> None:
    """The partition both sides train on (what fedge simulate itself writes)."""
    x, y, test = load_dataset(dataset, seed)
    save_shards(x, y, split(y, clients, partition, seed), directory)
    np.savez(directory / "test.npz", x=test.x, y=test.y)
    np.save(directory / "classes.npy", np.int64(max(y.max(), test.y.max()) + 1))


# ---------------------------------------------------------------------- output


def _fmt(side: dict[str, Any], key: str, spec: str) -> str:
    if "did_not_finish" in side:
        return "did not finish"
    value = side.get(key)
    return format(value, spec) if value is not None else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Clients, s/round and accuracy per side, and the ratios."""
    lines = [f"{'clients':>7}  {'fedge s/round':>14} {'Flower s/round':>15} {'ratio':>7}  "
             f"{'fedge acc':>9} {'Flower acc':>10}"]  # fmt: skip
    for row in rows:
        fedge, flower = row["fedge"], row["flower"]
        ratio = row.get("time_ratio_fedge_over_flower")
        lines.append(
            f"{row['clients']:>7}  {_fmt(fedge, 'seconds_per_round', '.3f'):>14} "
            f"{_fmt(flower, 'seconds_per_round', '.3f'):>15} "
            f"{format(ratio, '.2f') if ratio else '-':>7}  "
            f"{_fmt(fedge, 'final_accuracy', '.4f'):>9} {_fmt(flower, 'final_accuracy', '.4f'):>10}"
        )
    return "\n".join(lines)


def write_docs(result: dict[str, Any], path: Path) -> None:
    """docs/benchmarks.md, generated from the JSON."""
    env = result["environment"]
    body = [
        "# Benchmarks: fedge against Flower's own simulation",
        "",
        f"Generated by `benchmarks/flower_vs_fedge.py` on {result['timestamp']} "
        f"({env['platform']}, {env['cpu_count']} CPUs, Python {env['python']}, "
        f"flwr {env['packages'].get('flwr')}, ray {env['packages'].get('ray')}, "
        f"{env['mosquitto']}).",
        "",
        f"Command: `{env['command']}`",
        "",
        "Workload, identical on both sides: " + result["workload_text"],
        "",
        "| clients | fedge s/round | Flower s/round | fedge/Flower "
        "| fedge accuracy | Flower accuracy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        fedge, flower = row["fedge"], row["flower"]
        ratio = row.get("time_ratio_fedge_over_flower")
        shown = format(ratio, ".2f") if ratio else "-"
        body.append(
            f"| {row['clients']} | {_fmt(fedge, 'seconds_per_round', '.3f')} | "
            f"{_fmt(flower, 'seconds_per_round', '.3f')} | {shown} | "
            f"{_fmt(fedge, 'final_accuracy', '.4f')} | {_fmt(flower, 'final_accuracy', '.4f')} |"
        )
    notes = [
        f"* {row['clients']} clients, {side}: did not finish ({row[side]['did_not_finish']})"
        for row in result["rows"]
        for side in ("fedge", "flower")
        if "did_not_finish" in row[side]
    ]
    body += ["", *notes, "", "fedge goes through a real MQTT broker (mosquitto) with one "
             "connection per agent; Flower through its in-memory engine with Ray actors. "
             "Raw figures: `benchmarks/results/flower_vs_fedge.json`.", ""]  # fmt: skip
    path.write_text("\n".join(body))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--flower-worker"]:
        logging.basicConfig(level=logging.ERROR)
        shards_dir, clients, rounds, seed = Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(flower_worker(shards_dir, clients, rounds, seed)))
        return 0
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dataset", default="synthetic:20000,32,10")
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per side and size")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-vs-flower-") as tmp:
        root = Path(tmp)
        for clients in args.clients:
            shards = root / f"shards-{clients}"
            write_shards(args.dataset, args.partition, clients, args.seed, shards)
            print(f"{clients} clients: fedge...", file=sys.stderr)
            with mosquitto(root / f"broker-{clients}", timeout=10) as port:
                fedge = run_fedge(args.dataset, args.partition, clients, args.rounds, args.seed,
                                  f"mqtt://127.0.0.1:{port}", root, args.timeout)  # fmt: skip
            print(f"{clients} clients: Flower...", file=sys.stderr)
            flower = run_flower(shards, clients, args.rounds, args.seed, args.timeout)
            row: dict[str, Any] = {"clients": clients, "fedge": fedge, "flower": flower}
            if fedge.get("seconds_per_round") and flower.get("seconds_per_round"):
                row["time_ratio_fedge_over_flower"] = (
                    fedge["seconds_per_round"] / flower["seconds_per_round"]
                )
            rows.append(row)
            print(format_table(rows[-1:]), file=sys.stderr)
    print(format_table(rows))
    workload = (
        f"`{args.dataset}` split 70/30, the 70 % partitioned `{args.partition}` (seed "
        f"{args.seed}) over the clients; MLP features-{HIDDEN}-classes from the same "
        f"initial weights; every client in every round; {TRAIN['epochs']} local epoch(s) of "
        f"SGD (lr {TRAIN['lr']}, batch {TRAIN['batch_size']}) on 80 % of each shard; FedAvg; "
        f"{args.rounds} rounds; the global model evaluated on the 30 % after each round."
    )
    result = {
        "benchmark": "flower_vs_fedge",
        "timestamp": timestamp(),
        "workload_text": workload,
        "settings": vars(args) | {"out": str(args.out)},
        "rows": rows,
        "environment": environment(["fedge", "flwr", "ray", "paho-mqtt", "numpy"]),
    }
    write_json(args.out, result)
    if not args.no_docs:
        write_docs(result, DOCS)
        print(f"wrote {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
