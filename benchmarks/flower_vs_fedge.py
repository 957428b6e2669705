"""Benchmark: fedge simulate against Flower's own simulation on the identical workload.

For each client count in ``--clients`` (default 10, 100, 1000), the same workload
runs twice, one after the other:

* **fedge**: :func:`coordinator.sim.simulate.run_simulation` through a real mosquitto
  (127.0.0.1, anonymous): one real agent per client, each with its own MQTT
  connection and data directory, weights broadcast once per round, updates back over
  MQTT (fp32), FedAvg via Flower's strategy through fedge's MqttGrid.
* **Flower**: ``flwr.simulation.run_simulation`` (Ray backend, one CPU per client
  actor) with a ``ServerApp`` running Flower's ``FedAvg.start`` and a ``ClientApp``
  that trains with the very same trainer, data shard and held-out split as the fedge
  agent, in a separate process.

The model is ``--model``: ``mlp`` (default; the built-in numpy MLP features-64-classes)
or a torch model spec (``zoo:small_cnn``, ``module:function``) trained on both sides
by :class:`edge_agent.training.torch_trainer.TorchTrainer` with one torch thread per
client (the agents of the simulation and Flower's client actors alike). The CNN
workload is ``--model zoo:small_cnn --dataset digits-images`` (sklearn's digits as
1x8x8 images).

Identical on both sides: the dataset (``--dataset``, split 70/30, seeded), the
partition of the 70 % over the clients (``--partition``, seeded, what
:func:`coordinator.sim.fleet_data.fleet_data` makes of it, written once as
``shard<i>/local.npz``), the model definition and its initial weights
(:class:`coordinator.sim.sim_model.SimModel`, seeded), every client in
every round, local training (``--epochs``, ``--lr``, ``--batch-size``,
``--optimizer``, seeded per round and client), ``--rounds`` rounds, and evaluation of
the global model on the 30 % after each round
(:func:`coordinator.federated.models.evaluate_model`: accuracy, MSE or ROC-AUC by
task). Reported per client count and side: wall time per round (fedge: the round's
duration including its evaluation; Flower: time between successive evaluations; the
mean over the rounds and the median, which leaves out the first round's start-up),
the final metric, and the ratio fedge/Flower. A side that fails or exceeds
``--timeout`` seconds is reported as "did not finish" with the reason. Prints a table,
writes JSON (``benchmarks/results/flower_vs_fedge.json`` for the MLP,
``flower_vs_fedge_<model>.json`` otherwise) and replaces the workload's section of
``docs/benchmarks.md``::

    python benchmarks/flower_vs_fedge.py --clients 10,100,1000 --rounds 5
    python benchmarks/flower_vs_fedge.py --model zoo:small_cnn --dataset digits-images \\
        --clients 10,100 --rounds 3

Needs Flower's simulation extra (Ray): ``pip install -e '.[bench]'``.
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
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from _support import (
    DOCS,
    argument_parser,
    environment,
    load_text,
    mosquitto,
    repository_path,
    timestamp,
    write_doc_section,
    write_json,
)
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation as flower_simulation

from coordinator.delivery.packaging import LabelledData
from coordinator.federated.models import PRIMARY_METRIC, ModelDef, evaluate_model
from coordinator.sim.fleet_data import fleet_data
from coordinator.sim.local_fleet import save_shards
from coordinator.sim.sim_model import BUILTIN_FAMILIES, SimModel
from coordinator.sim.simulate import SimulationConfig, run_simulation
from edge_agent.training.data import LocalData
from edge_agent.training.model_spec import check_task, parse_model_spec
from edge_agent.training.numpy_trainers import trainer_for
from edge_agent.training.torch_trainer import TorchTrainer
from edge_agent.training.trainer import TrainConfig, Trainer

RESULTS = Path("benchmarks/results")
"""Where the JSON goes by default (the scripts run from the repository root)."""
HOLDOUT = 0.2
"""The agents' default ``training.holdout_fraction``."""
TORCH_THREADS = 1
"""torch threads per client, on both sides."""
RATIOS = {
    "seconds_per_round": "time_ratio_fedge_over_flower",
    "median_seconds_per_round": "median_ratio_fedge_over_flower",
}
"""Timing figure of both sides -> the name of their ratio fedge/Flower in a row."""


def model_name(model: str) -> str:
    """``mlp``, or the factory's name of a torch spec (``small_cnn``)."""
    return model if model in BUILTIN_FAMILIES else parse_model_spec(model).name


# ------------------------------------------------------------------ Flower side


def make_trainer(model: ModelDef) -> Trainer:
    """The trainer an agent builds for a task of ``model`` (edge_agent.training.task_model)."""
    if not model.is_torch:
        return trainer_for(model.family)
    return TorchTrainer(
        model.spec, task=model.task, input_shape=model.input_shape,
        num_outputs=model.num_outputs, num_threads=TORCH_THREADS,
    )  # fmt: skip


def flower_worker(shards_dir: Path, clients: int, rounds: int) -> dict[str, Any]:
    """Run Flower's simulation in this process; return its figures."""
    workload = json.loads((shards_dir / "workload.json").read_text())
    fields = workload["model"]
    model = ModelDef(**{**fields, "input_shape": tuple(fields["input_shape"])})
    train_settings = workload["train"]
    test = np.load(shards_dir / "test.npz")
    test_set = LabelledData(test["x"], test["y"], task=model.task)
    metric = PRIMARY_METRIC[model.task]
    initial = dict(np.load(shards_dir / "initial.npz"))
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:  # Flower's signature
        index = int(context.node_config["partition-id"])
        weights = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        config = TrainConfig.from_mapping({**train_settings, "server_round": server_round})
        data, _held_out = LocalData(shards_dir / f"shard{index}").split(
            HOLDOUT, seed=config.seed, task=model.task
        )
        rng = config.rng(f"r{server_round}", f"sim{index:02d}")  # as agent sim<NN> seeds it
        fitted = make_trainer(model).fit(weights, data, config, rng)
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: _array(v) for k, v in fitted.weights.items()}),
                "metrics": MetricRecord({"num-examples": fitted.num_examples}),
            }
        )
        return Message(content, reply_to=msg)

    marks: list[float] = []
    values: list[float] = []
    failures: list[str] = []
    server_app = ServerApp()

    class CountingFedAvg(FedAvg):
        """Flower's FedAvg that keeps the errors of failed client replies."""

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            failures.extend(str(r.error.reason)[:200] for r in replies if r.has_error())
            return super().aggregate_train(server_round, replies)

    @server_app.main()
    def main(grid: Grid, _context: Context) -> None:
        strategy = CountingFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
            min_available_nodes=clients,
        )  # fmt: skip

        def evaluate(_round: int, arrays: ArrayRecord) -> MetricRecord:
            trained = {k: v.numpy() for k, v in arrays.items()}
            metrics = evaluate_model(model, trained, test_set)
            marks.append(time.monotonic())
            values.append(metrics[metric])
            return MetricRecord(dict[str, int | float | list[int] | list[float]](metrics))

        strategy.start(grid=grid, initial_arrays=ArrayRecord(
            {k: _array(v) for k, v in initial.items()}), num_rounds=rounds,
            evaluate_fn=evaluate)  # fmt: skip

    started = time.monotonic()
    flower_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return _timing([b - a for a, b in itertools.pairwise(marks)]) | {
        "final_metric": values[-1] if values else None,
        "client_failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "total_s": time.monotonic() - started,
    }


def _array(value: Any) -> Any:
    return Array(np.ascontiguousarray(value))


def _timing(per_round: list[float]) -> dict[str, Any]:
    return {
        "seconds_per_round": statistics.mean(per_round) if per_round else None,
        "median_seconds_per_round": statistics.median(per_round) if per_round else None,
        "round_seconds": per_round,
    }


def run_flower(shards_dir: Path, clients: int, rounds: int, timeout: float) -> dict[str, Any]:
    """Flower's simulation in a child process (Ray stays out of this one)."""
    command = [sys.executable, __file__, "--flower-worker", str(shards_dir), str(clients),
               str(rounds)]  # fmt: skip
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"did_not_finish": f"exceeded {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"did_not_finish": f"exit {out.returncode}: {' | '.join(tail)[:300]}"}
    figures = dict(json.loads(lines[-1]))
    if figures["client_failures"]:  # the global model did not learn from those clients
        return {"did_not_finish": f"{figures['client_failures']} client replies failed, "
                f"the first: {figures['first_failure']}"}  # fmt: skip
    return figures


# ------------------------------------------------------------------- fedge side


def simulation_config(args: Any, clients: int, out: Path, url: str) -> SimulationConfig:
    """What ``fedge simulate`` is asked to run for ``clients``."""
    return SimulationConfig(
        out=out, agents=clients, rounds=args.rounds, dataset=args.dataset,
        partition=args.partition, broker=url, seed=args.seed, hidden=args.hidden,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        round_timeout_s=args.timeout, model=args.model, task=args.task,
        optimizer=args.optimizer,
    )  # fmt: skip


def run_fedge(config: SimulationConfig) -> dict[str, Any]:
    """fedge simulate through the broker of ``config``."""
    started = time.monotonic()
    try:
        report = run_simulation(config).to_json()
    except Exception as exc:  # noqa: BLE001 - reported as "did not finish"
        return {"did_not_finish": f"{type(exc).__name__}: {exc}"[:300]}
    rounds = [r["seconds"] for r in report["rounds"]]
    return _timing(rounds) | {
        "final_metric": report["final_metrics"].get(report["metric"]),
        "centralized_metric": report["centralized_metrics"].get(report["metric"]),
        "rounds_ok": report["rounds_ok"],
        "agents_updated": report["rollout"]["agents_updated"],
        "total_s": time.monotonic() - started,
    }


def write_shards(args: Any, clients: int, directory: Path) -> tuple[ModelDef, dict[str, int]]:
    """What both sides train: the data, partition, model and initial weights exactly as
    ``fedge simulate`` makes them (:class:`~coordinator.sim.sim_model.SimModel`), the
    local training settings as it sends them.

    Returns:
        The model, and the fewest and most training examples a client holds.
    """
    task = None if args.task is None else check_task(args.task)
    data = fleet_data(args.dataset, args.partition, clients, args.seed, task=task)
    sim = SimModel.choose(args.model, args.task, data, hidden=args.hidden)
    save_shards(sim.rows(data.x), data.y, data.parts, directory)
    test = sim.test
    np.savez(directory / "test.npz", x=test.x, y=test.y)
    np.savez(directory / "initial.npz", **sim.initial_weights(args.seed))  # type: ignore[arg-type]
    train = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        seed=args.seed,
    )
    workload = {"model": asdict(sim.model), "train": train.to_mapping()}
    (directory / "workload.json").write_text(json.dumps(workload))
    sizes: dict[str, int] = data.to_json()["examples_per_agent"]
    return sim.model, sizes


# ---------------------------------------------------------------------- output


def _fmt(side: dict[str, Any], key: str, spec: str) -> str:
    if "did_not_finish" in side:
        return "did not finish"
    value = side.get(key)
    return format(value, spec) if value is not None else "-"


def _ratio(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return format(value, ".2f") if value else "-"


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """Clients, s/round (mean, median) and the metric per side, and the ratios."""
    lines = [f"{'clients':>7}  {'fedge s/round':>14} {'Flower s/round':>15} {'ratio':>6}  "
             f"{'fedge median':>12} {'Flower median':>13} {'ratio':>6}  "
             f"{'fedge ' + metric:>14} {'Flower ' + metric:>15}"]  # fmt: skip
    for row in rows:
        fedge, flower = row["fedge"], row["flower"]
        lines.append(
            f"{row['clients']:>7}  {_fmt(fedge, 'seconds_per_round', '.3f'):>14} "
            f"{_fmt(flower, 'seconds_per_round', '.3f'):>15} "
            f"{_ratio(row, 'time_ratio_fedge_over_flower'):>6}  "
            f"{_fmt(fedge, 'median_seconds_per_round', '.3f'):>12} "
            f"{_fmt(flower, 'median_seconds_per_round', '.3f'):>13} "
            f"{_ratio(row, 'median_ratio_fedge_over_flower'):>6}  "
            f"{_fmt(fedge, 'final_metric', '.4f'):>14} {_fmt(flower, 'final_metric', '.4f'):>15}"
        )
    return "\n".join(lines)


def docs_section(result: dict[str, Any]) -> str:
    """The workload's section of docs/benchmarks.md, generated from the JSON."""
    env, metric = result["environment"], result["metric"]
    title = "MLP" if result["model"] == "mlp" else f"`{result['model']}`"
    body = [
        f"## fedge against Flower's own simulation: {title} (`benchmarks/flower_vs_fedge.py`)",
        "",
        f"Generated by `benchmarks/flower_vs_fedge.py` on {result['timestamp']} "
        f"({env['platform']}, {env['cpu_count']} CPUs, Python {env['python']}, "
        f"flwr {env['packages'].get('flwr')}, ray {env['packages'].get('ray')}, "
        f"torch {env['packages'].get('torch')}, {env['mosquitto']}; {load_text(env)}).",
        "",
        f"Command: `{env['command']}`",
        "",
        "Workload, identical on both sides: " + result["workload_text"],
        "",
        "| clients | fedge s/round | Flower s/round | fedge/Flower | fedge median s/round "
        f"| Flower median s/round | fedge/Flower (median) | fedge {metric} | Flower {metric} |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        fedge, flower = row["fedge"], row["flower"]
        body.append(
            f"| {row['clients']} | {_fmt(fedge, 'seconds_per_round', '.3f')} | "
            f"{_fmt(flower, 'seconds_per_round', '.3f')} | "
            f"{_ratio(row, 'time_ratio_fedge_over_flower')} | "
            f"{_fmt(fedge, 'median_seconds_per_round', '.3f')} | "
            f"{_fmt(flower, 'median_seconds_per_round', '.3f')} | "
            f"{_ratio(row, 'median_ratio_fedge_over_flower')} | "
            f"{_fmt(fedge, 'final_metric', '.4f')} | {_fmt(flower, 'final_metric', '.4f')} |"
        )
    notes = [
        f"* {row['clients']} clients, {side}: did not finish ({row[side]['did_not_finish']})"
        for row in result["rows"]
        for side in ("fedge", "flower")
        if "did_not_finish" in row[side]
    ]
    settings = result["settings"]
    raw = repository_path(settings["out"])
    sizes = "; ".join(
        f"{row['clients']} clients: {row['examples_per_client']['min']} to "
        f"{row['examples_per_client']['max']}"
        for row in result["rows"]
    )
    small = (
        f"Kept small for a 2-core machine that runs every client: {settings['rounds']} "
        f"rounds of {settings['epochs']} local epoch(s). "
        if result["model_def"]["family"] == "torch"
        else ""
    )
    finished = [r for r in result["rows"] if "did_not_finish" not in r["fedge"]
                and "did_not_finish" not in r["flower"]]  # fmt: skip
    if finished and all(
        r["fedge"]["final_metric"] == r["flower"]["final_metric"] for r in finished
    ):
        small += (
            f"Both sides end with the same {metric} at every size that finished: they "
            "trained the same thing. "
        )
    body += ["", *notes, "", f"Training examples per client (before the 20 % hold-out): "
             f"{sizes}. {small}{steady_text(result['rows'])}fedge goes through a real MQTT "
             "broker (mosquitto) with one "
             "connection per agent; Flower through its in-memory engine with Ray actors. "
             "The mean per round includes the first round (Flower starts its Ray actors, "
             "and with a torch model every actor imports torch); the median leaves it out. "
             f"Raw figures: `{raw}`.", ""]  # fmt: skip
    return "\n".join(body)


def steady_text(rows: list[dict[str, Any]]) -> str:
    """Which side is faster per round once both have started (the medians)."""
    ratio = "median_ratio_fedge_over_flower"
    slower = [str(r["clients"]) for r in rows if r.get(ratio) and r[ratio] > 1]
    faster = [str(r["clients"]) for r in rows if r.get(ratio) and r[ratio] <= 1]
    parts = []
    if slower:
        parts.append(f"slower than Flower at {', '.join(slower)} clients")
    if faster:
        parts.append(f"as fast or faster at {', '.join(faster)} clients")
    if not parts:
        return ""
    return "Leaving out the start-up round (the medians), fedge is " + " and ".join(parts) + ". "


def workload_text(args: Any, model: ModelDef) -> str:
    """One paragraph: what both sides run."""
    if model.is_torch:
        shape = "x".join(map(str, model.input_shape))
        what = (
            f"the torch model `{model.spec}` ({model.task}, input {shape}, "
            f"{model.num_outputs} outputs) trained by `TorchTrainer` with {TORCH_THREADS} "
            "torch thread per client"
        )
    else:
        what = f"the numpy {model.family.upper()} features-{args.hidden}-classes"
    return (
        f"`{args.dataset}` split 70/30, the 70 % partitioned `{args.partition}` (seed "
        f"{args.seed}) over the clients; {what}, from the same initial weights; every client "
        f"in every round; {args.epochs} local epoch(s) of {args.optimizer.upper()} (lr "
        f"{args.lr}, batch {args.batch_size}) on 80 % of each shard; FedAvg; {args.rounds} "
        f"rounds; the global model evaluated on the 30 % after each round "
        f"({PRIMARY_METRIC[model.task]})."
    )


def client_counts(values: list[str]) -> list[int]:
    """``--clients 10,100`` or ``--clients 10 100``."""
    counts = [int(part) for value in values for part in value.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit("--clients needs positive counts, e.g. 10,100")
    return counts


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--flower-worker"]:
        logging.basicConfig(level=logging.ERROR)
        shards_dir, clients, rounds = Path(argv[1]), int(argv[2]), int(argv[3])
        print(json.dumps(flower_worker(shards_dir, clients, rounds)))
        return 0
    parser = argument_parser(__doc__, Path("default"))
    parser.add_argument("--clients", nargs="+", default=["10,100,1000"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="mlp", help="mlp, softmax or a torch model spec")
    parser.add_argument("--task", default=None, help="default: the dataset's / factory's task")
    parser.add_argument("--dataset", default="synthetic:20000,32,10")
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per side and size")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    name = model_name(args.model)
    if args.out == Path("default"):
        suffix = "" if name == "mlp" else f"_{name}"
        args.out = RESULTS / f"flower_vs_fedge{suffix}.json"
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    model: ModelDef | None = None
    with tempfile.TemporaryDirectory(prefix="fedge-vs-flower-") as tmp:
        root = Path(tmp)
        for clients in client_counts(args.clients):
            shards = root / f"shards-{clients}"
            model, sizes = write_shards(args, clients, shards)
            metric = PRIMARY_METRIC[model.task]
            print(f"{clients} clients: fedge...", file=sys.stderr)
            with mosquitto(root / f"broker-{clients}", timeout=10) as port:
                url = f"mqtt://127.0.0.1:{port}"
                fedge = run_fedge(simulation_config(args, clients, root / f"fedge-{clients}", url))
            print(f"{clients} clients: Flower...", file=sys.stderr)
            flower = run_flower(shards, clients, args.rounds, args.timeout)
            row: dict[str, Any] = {"clients": clients, "examples_per_client": sizes,
                                   "fedge": fedge, "flower": flower}  # fmt: skip
            for key, ratio in RATIOS.items():
                if fedge.get(key) and flower.get(key):
                    row[ratio] = fedge[key] / flower[key]
            rows.append(row)
            print(format_table(rows[-1:], metric), file=sys.stderr)
    assert model is not None
    metric = PRIMARY_METRIC[model.task]
    print(format_table(rows, metric))
    result = {
        "benchmark": "flower_vs_fedge",
        "timestamp": timestamp(),
        "model": args.model,
        "model_def": asdict(model),
        "metric": metric,
        "workload_text": workload_text(args, model),
        "settings": vars(args) | {"out": str(args.out)},
        "rows": rows,
        "environment": environment(["fedge", "flwr", "ray", "torch", "paho-mqtt", "numpy"]),
    }
    write_json(args.out, result)
    if not args.no_docs:
        write_doc_section(DOCS, docs_section(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
