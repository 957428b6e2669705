"""Benchmark: update codecs, final accuracy against uplink bytes per round, vs fp32.

The workload of the federated tests: sklearn digits (stratified 70/30 split),
the training part split over ``--clients`` in-process agents with Dirichlet(``--alpha``)
label skew, an MLP 64-``--hidden``-10, FedAvg over ``--rounds`` rounds, every client
in every round, two local epochs of SGD (lr 0.05, batch 16), the global model
evaluated on the held-out test set after each round. Agents and coordinator talk
through a real mosquitto (127.0.0.1, the shipped ACL, passwords).

For each codec, one seeded run (sampling, local training and stochastic rounding
are seeded, so a rerun gives the same figures). Reported per codec: final accuracy
and its difference to fp32 in points, the uplink MQTT payload bytes per round
(every byte devices sent: acks, update reports with their headers) and the ratio
fp32 / codec, the downlink bytes per round, and wall time per round. Prints a table
and writes JSON::

    python benchmarks/codecs.py --out benchmarks/results/codecs.json
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _support import argument_parser, environment, mosquitto, password, write_json

from compress.families import init_weights
from compress.keys import generate_signing_key, save_keypair
from coordinator.delivery.packaging import LabelledData
from coordinator.federated.runs import RunConfig, RunResult, run_training
from coordinator.federated.strategies import build_strategy
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.sim.datasets import load_digits_split
from coordinator.sim.local_fleet import LocalFleet, write_shards
from edge_agent.config.agent import BrokerConfig

DEFAULT_OUT = Path(__file__).parent / "results" / "codecs.json"
DEFAULT_CODECS = (
    "fp32",
    "fp16",
    "int8",
    "topk:0.01",
    "topk:0.01+int8",
    "topk:0.03+int8",
    "topk:0.05+int8",
)
TRAIN_CONFIG: dict[str, int | float | str | bool] = {"epochs": 2, "lr": 0.05, "batch_size": 16}


def _run(coordinator: MqttHub, codec: str, args: Any, test_set: LabelledData) -> RunResult:
    weights = init_weights("mlp", [64, args.hidden, 10], np.random.default_rng(args.seed))
    config = RunConfig(
        model=f"bench-{codec.replace(':', '-').replace('+', '-')}",
        family="mlp",
        initial_weights=weights,
        rounds=args.rounds,
        clients_per_round=args.clients,
        min_clients=args.clients,
        round_timeout_s=60.0,
        codec=codec,
        train_config={**TRAIN_CONFIG, "seed": args.seed},
        eval_data=test_set,
        seed=args.seed,
    )
    strategy = build_strategy("fedavg", {}, federated_eval=False)
    return run_training(coordinator, strategy, config)


def _row(codec: str, result: RunResult) -> dict[str, Any]:
    ok = [r for r in result.rounds if r.status == "ok"]
    return {
        "codec": codec,
        "final_accuracy": result.final_accuracy,
        "rounds_ok": len(ok),
        "uplink_bytes_per_round": statistics.mean(r.uplink_bytes for r in result.rounds),
        "downlink_bytes_per_round": statistics.mean(r.downlink_bytes for r in result.rounds),
        "seconds_per_round": statistics.mean(r.seconds for r in result.rounds),
        "rounds": [r.to_json() for r in result.rounds],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows side by side with fp32 (the first row)."""
    base = rows[0]
    lines = [
        f"{'codec':<16} {'accuracy':>9} {'vs fp32':>8} {'up/round':>12} {'fp32/codec':>10} "
        f"{'down/round':>11} {'s/round':>8}",
    ]
    for row in rows:
        accuracy = row["final_accuracy"] or 0.0
        delta = 100 * (accuracy - (base["final_accuracy"] or 0.0))
        ratio = base["uplink_bytes_per_round"] / row["uplink_bytes_per_round"]
        lines.append(
            f"{row['codec']:<16} {100 * accuracy:8.2f}% {delta:+7.2f}p "
            f"{row['uplink_bytes_per_round']:12,.0f} {ratio:9.1f}x "
            f"{row['downlink_bytes_per_round']:11,.0f} {row['seconds_per_round']:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--clients", type=int, default=10, help="devices (all train every round)")
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds per codec")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden units")
    parser.add_argument("--seed", type=int, default=0, help="split, sampling and training seed")
    parser.add_argument("--codec", action="append", help="codec to run (repeatable; fp32 first)")
    args = parser.parse_args(argv)
    codecs = list(dict.fromkeys(["fp32", *(args.codec or DEFAULT_CODECS)]))
    logging.getLogger("flwr").setLevel(logging.WARNING)

    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    test_set = LabelledData(x_test, y_test)
    devices = [f"sim{i:02d}" for i in range(args.clients)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        root = Path(tmp)
        shards = write_shards(x_train, y_train, clients=args.clients, alpha=args.alpha,
                              directory=root / "data", seed=args.seed)  # fmt: skip
        _private, public = save_keypair(generate_signing_key(), root / "keys")
        with mosquitto(root / "broker", users=[*devices, "coordinator"], timeout=10) as port:

            def broker_for(user: str) -> BrokerConfig:
                url = f"mqtt://127.0.0.1:{port}"
                return BrokerConfig.from_url(url, username=user, password=password(user))

            with LocalFleet.start(shards, broker_for=broker_for, trust=[public],
                                  root=root / "agents") as fleet:  # fmt: skip
                coordinator = MqttHub(HubConfig(broker=broker_for("coordinator")))
                coordinator.start()
                try:
                    fleet.wait_eligible(coordinator, args.clients, timeout=30)
                    for codec in codecs:
                        print(f"running {codec}...", file=sys.stderr)
                        rows.append(_row(codec, _run(coordinator, codec, args, test_set)))
                finally:
                    coordinator.stop()
    print(format_table(rows))
    base = rows[0]
    result = {
        "benchmark": "codecs",
        "workload": {
            "dataset": "sklearn digits, stratified 70/30 split",
            "clients": args.clients,
            "alpha": args.alpha,
            "model": f"mlp 64-{args.hidden}-10",
            "strategy": "fedavg, every client every round",
            "rounds": args.rounds,
            "local_training": TRAIN_CONFIG,
            "seed": args.seed,
        },
        "baseline": "fp32",
        "rows": [
            {
                **row,
                "accuracy_delta_points": 100
                * ((row["final_accuracy"] or 0.0) - (base["final_accuracy"] or 0.0)),
                "uplink_ratio_vs_fp32": base["uplink_bytes_per_round"]
                / row["uplink_bytes_per_round"],
            }
            for row in rows
        ],
        "environment": environment(["fedge", "flwr", "numpy", "paho-mqtt"]),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
