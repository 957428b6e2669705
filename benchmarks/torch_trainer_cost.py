"""Benchmark: what the torch trainer costs on a device, against the numpy MLP.

The same data on both sides: scikit-learn's digits (scaled to [0, 1], split 70/30
with the seed, :func:`coordinator.sim.datasets.load_digits_split`), the built-in
numpy MLP (64-``--hidden``-10) on the rows and the zoo's ``small_cnn`` on the same
pixels as 1x8x8 images. For each model, in turn:

1. a real ``fedge-agent run`` process (``python -m edge_agent.cli run``) starts with
   its own data directory, the training split as ``--train-data`` (``local.npz``) and
   ``[training] torch_threads = --torch-threads`` in its config file, connected to a
   mosquitto broker (loopback, anonymous);
2. once the coordinator sees it online with training data and ``--settle`` seconds
   have passed, its **idle** ``VmRSS`` / ``VmHWM`` are read from
   ``/proc/<pid>/status``;
3. the coordinator (an in-process :class:`~coordinator.link.hub.MqttHub`) drives
   ``--rounds`` federated rounds with that one device
   (:func:`coordinator.federated.runs.run_training`, FedAvg, fp32 updates, the global
   model evaluated on the 30 % after each round); after each round the process's
   ``VmRSS`` and ``VmHWM`` are read again. ``VmHWM`` is the kernel's peak resident set
   of the process, so after a round it is the **peak while training** (the first
   round includes the device importing torch and building the model);
4. **seconds per local epoch** come from the device itself: the ``train_seconds``
   metric of each ``update_report`` (the time ``Trainer.fit`` took on the device,
   heard on the coordinator's hub), divided by ``--epochs``. It times the fit only:
   importing torch and building the model happen before it, in the first round, and
   show in that round's wall time (the coordinator's round, weights out to update
   in). The first round and the median of the later rounds are reported apart.

Also measured: the RSS of a python process that only imports numpy, and of one that
imports numpy and torch (``import torch`` alone), read the same way.

Every process and broker started is stopped, and the temporary directory removed, on
the way out. Prints a table (the two models side by side) and writes JSON (and,
unless ``--no-docs``, its section of ``docs/benchmarks.md``)::

    python benchmarks/torch_trainer_cost.py --out benchmarks/results/torch_trainer_cost.json
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _support import (
    DOCS,
    argument_parser,
    environment,
    load_text,
    mosquitto,
    proc_memory_kib,
    ready_process_memory,
    stop_process,
    timestamp,
    wait_until,
    write_doc_section,
    write_json,
)

from compress.keys import generate_signing_key, save_keypair
from coordinator.delivery.packaging import LabelledData
from coordinator.federated.models import ModelDef, initial_weights, model_def_for
from coordinator.federated.runs import RoundReport, RunConfig, run_training
from coordinator.federated.strategies import build_strategy
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.sim.datasets import load_digits_split
from edge_agent.config.agent import BrokerConfig
from edge_agent.protocol import Envelope, UpdateReport

DEFAULT_OUT = Path("benchmarks/results/torch_trainer_cost.json")
STARTUP_TIMEOUT_S = 60.0
KIB_PER_MIB = 1024
MODELS = ("mlp", "zoo:small_cnn")

# A python process that imports what argv names, says "ready" and waits for stdin to close.
IMPORT_SCRIPT = """\
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print("ready", flush=True)
sys.stdin.read()
"""


# --------------------------------------------------------------------------- baselines


def import_rss(modules: list[str]) -> dict[str, int]:
    """VmRSS/VmHWM (KiB) of a python process that imported ``modules``."""
    return ready_process_memory(IMPORT_SCRIPT, modules, f"importing {modules}")


# --------------------------------------------------------------------------- one model


class TrainSeconds:
    """Hub listener: ``train_seconds`` and ``num_examples`` of every update report."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.examples: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, _device_id: str, envelope: Envelope, _size: int) -> None:
        message = envelope.message
        if isinstance(message, UpdateReport) and "train_seconds" in message.metrics:
            with self._lock:
                self.values.append(float(message.metrics["train_seconds"]))
                self.examples.append(message.num_examples)


def anonymous(port: int, user: str) -> BrokerConfig:
    """Connection settings on the anonymous benchmark broker."""
    return BrokerConfig(host="127.0.0.1", port=port, tls=False, username=user,
                        reconnect_min_s=1.0, reconnect_max_s=2.0)  # fmt: skip


def start_agent(
    device_id: str, port: int, workdir: Path, public_key: Path, torch_threads: int
) -> tuple[subprocess.Popen[bytes], Path]:
    """``fedge-agent run`` for ``device_id`` on the data in ``workdir/<id>-train``."""
    config = workdir / f"{device_id}.toml"
    config.write_text(f"[training]\ntorch_threads = {torch_threads}\n")
    log = workdir / f"{device_id}.log"
    args = [
        sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config),
        "--device-id", device_id, "--broker", f"mqtt://127.0.0.1:{port}",
        "--trust", str(public_key), "--data-dir", str(workdir / f"{device_id}-data"),
        "--train-data", str(workdir / f"{device_id}-train"),
    ]  # fmt: skip
    with log.open("ab") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    return process, log


def measure_model(
    spec: str, data: dict[str, Any], args: Any, port: int, workdir: Path, public_key: Path
) -> dict[str, Any]:
    """Idle and training RSS of an agent process, and its seconds per local epoch."""
    is_mlp = spec == "mlp"
    x_train, x_test = data["x_train"], data["x_test"]
    if not is_mlp:  # the same pixels as 1x8x8 images
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    device_id = "bench-" + ("mlp" if is_mlp else "cnn")
    train_dir = workdir / f"{device_id}-train"
    train_dir.mkdir()
    np.savez(train_dir / "local.npz", x=x_train, y=data["y_train"])
    classes = int(max(data["y_train"].max(), data["y_test"].max())) + 1
    model: ModelDef = model_def_for(spec, None, tuple(x_train.shape[1:]), classes)

    process, log = start_agent(device_id, port, workdir, public_key, args.torch_threads)
    hub = MqttHub(HubConfig(broker=anonymous(port, "coordinator")))
    seconds = TrainSeconds()
    memory: list[dict[str, int]] = []
    try:
        hub.start(timeout=30.0)
        hub.add_listener(seconds)

        def eligible() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the agent exited: {log.read_text()[-2000:]}")
            record = hub.device(device_id)
            return record is not None and record.online and record.can_train

        wait_until(eligible, STARTUP_TIMEOUT_S, f"{device_id} to come online with data")
        time.sleep(args.settle)
        idle = proc_memory_kib(process.pid)

        def after_round(_report: RoundReport, what: str) -> None:
            if what == "done":
                memory.append(proc_memory_kib(process.pid))

        run = RunConfig(
            model=f"bench-{model.family}", family=model.family,
            model_def=model if model.is_torch else None,
            initial_weights=initial_weights(model, args.seed, args.hidden),
            rounds=args.rounds, clients_per_round=1, min_clients=1,
            round_timeout_s=args.round_timeout,
            train_config={"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                          "seed": args.seed},
            eval_data=LabelledData(x_test, data["y_test"]), seed=args.seed,
        )  # fmt: skip
        strategy = build_strategy("fedavg", {}, federated_eval=False)
        result = run_training(hub, strategy, run, on_round=after_round)
        # the last update report may arrive on the network thread just after the round
        wait_until(lambda: len(seconds.values) >= args.rounds, 10.0, "every update report")
    finally:
        hub.stop()
        stop_process(process)
    failed = [r.to_json() for r in result.rounds if r.status != "ok"]
    if failed:
        raise RuntimeError(f"{spec}: rounds failed: {failed}")
    per_epoch = [value / args.epochs for value in seconds.values]
    return {
        "model": spec,
        "model_def": {
            "family": model.family,
            "spec": model.spec,
            "task": model.task,
            "input_shape": list(model.input_shape),
        },
        "parameters": int(sum(np.asarray(v).size for v in run.initial_weights.values())),
        "train_examples_on_device": seconds.examples[-1],
        "idle_kib": idle,
        "after_round_kib": memory,
        "peak_training_rss_kib": memory[-1]["VmHWM"],
        "rss_after_training_kib": memory[-1]["VmRSS"],
        "seconds_per_epoch_by_round": [round(v, 4) for v in per_epoch],
        "seconds_per_epoch_first_round": round(per_epoch[0], 4),
        "seconds_per_epoch": round(statistics.median(per_epoch[1:] or per_epoch), 4),
        "round_seconds": [round(r.seconds, 3) for r in result.rounds],
        "median_round_seconds": statistics.median(r.seconds for r in result.rounds[1:]),
        "final_accuracy": result.final_accuracy,
    }


# --------------------------------------------------------------------------- output


def mib(kib: int) -> str:
    """KiB as MiB, one decimal."""
    return f"{kib / KIB_PER_MIB:.1f}"


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, numpy MLP, torch small_cnn) lines of the comparison."""
    mlp, cnn = (result["models"][name] for name in MODELS)

    def both(get: Callable[[dict[str, Any]], str]) -> tuple[str, str]:
        return get(mlp), get(cnn)

    return [
        ("parameters", *both(lambda m: str(m["parameters"]))),
        ("agent VmRSS idle (MiB)", *both(lambda m: mib(m["idle_kib"]["VmRSS"]))),
        ("agent VmHWM idle (MiB)", *both(lambda m: mib(m["idle_kib"]["VmHWM"]))),
        ("agent VmHWM training (MiB)", *both(lambda m: mib(m["peak_training_rss_kib"]))),
        ("agent VmRSS after (MiB)", *both(lambda m: mib(m["rss_after_training_kib"]))),
        ("round wall time, first (s)", *both(lambda m: f"{m['round_seconds'][0]:.3f}")),
        ("round wall time, later (s)", *both(lambda m: f"{m['median_round_seconds']:.3f}")),
        ("s/epoch, first round", *both(lambda m: f"{m['seconds_per_epoch_first_round']:.4f}")),
        ("s/epoch, later rounds", *both(lambda m: f"{m['seconds_per_epoch']:.4f}")),
        ("accuracy after rounds", *both(lambda m: f"{m['final_accuracy']:.4f}")),
    ]


def format_table(result: dict[str, Any]) -> str:
    """The two models side by side, then the import baselines."""
    header = f"{'':<28} {'numpy MLP':>12} {'torch small_cnn':>16}"
    lines = [header, "-" * len(header)]
    lines += [f"{what:<28} {a:>12} {b:>16}" for what, a, b in table_rows(result)]
    base = result["imports"]
    lines += [
        "",
        f"python + numpy:         VmRSS {mib(base['numpy']['VmRSS'])} MiB",
        f"python + numpy + torch: VmRSS {mib(base['numpy+torch']['VmRSS'])} MiB "
        f"(import torch: +{mib(base['numpy+torch']['VmRSS'] - base['numpy']['VmRSS'])} MiB)",
    ]
    return "\n".join(lines)


def docs_section(result: dict[str, Any]) -> str:
    """The ``torch_trainer_cost`` section of docs/benchmarks.md."""
    env, s = result["environment"], result["settings"]
    base = result["imports"]
    torch_import = base["numpy+torch"]["VmRSS"] - base["numpy"]["VmRSS"]
    lines = [
        "## Device cost of the torch trainer (`benchmarks/torch_trainer_cost.py`)",
        "",
        f"Measured on {result['timestamp']} ({env['platform']}, {env['cpu_count']} CPUs, "
        f"Python {env['python']}, torch {env['packages'].get('torch')}; {load_text(env)}). "
        f"Command: `{env['command']}`",
        "",
        "A real `fedge-agent run` process per model, on the same digits training split "
        f"(the numpy MLP 64-{s['hidden']}-10 on rows, the zoo's `small_cnn` on 1x8x8 images; "
        f"{s['torch_threads']} torch thread), drives {s['rounds']} rounds of {s['epochs']} "
        f"local epochs (SGD, lr {s['lr']}, batch {s['batch_size']}) from an in-process "
        "coordinator over mosquitto. Memory from `/proc/<pid>/status` (VmHWM is the "
        "process's peak); seconds per epoch are the device's own `train_seconds` divided "
        "by the epochs: the fit alone. Importing torch and building the model come before "
        "the fit in the first round and show in its wall time (the round as the coordinator "
        "sees it: weights out, training, update in, evaluation); the later figures are "
        "medians over the other rounds.",
        "",
        "| | numpy MLP | torch small_cnn |",
        "|---|---:|---:|",
    ]
    lines += [f"| {what} | {a} | {b} |" for what, a, b in table_rows(result)]
    lines += [
        "",
        f"`import torch` alone: a python process with numpy has VmRSS "
        f"{mib(base['numpy']['VmRSS'])} MiB, with numpy and torch "
        f"{mib(base['numpy+torch']['VmRSS'])} MiB (+{mib(torch_import)} MiB). "
        "The agent imports torch only when it trains a torch model, so an idle agent "
        "does not pay for it. Raw figures: `benchmarks/results/torch_trainer_cost.json`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="split, weights and training seed")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per model (>= 2)")
    parser.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds online before idle")
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.epochs < 1 or args.torch_threads < 1:
        parser.error("need --rounds >= 2, --epochs >= 1 and --torch-threads >= 1")

    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    print("import baselines...", file=sys.stderr)
    imports = {"numpy": import_rss(["numpy"]), "numpy+torch": import_rss(["numpy", "torch"])}
    workdir = Path(tempfile.mkdtemp(prefix="fedge-bench-torch-cost-"))
    models: dict[str, Any] = {}
    try:
        _private, public = save_keypair(generate_signing_key(), workdir / "keys")
        with mosquitto(workdir / "broker", timeout=STARTUP_TIMEOUT_S) as port:
            for spec in MODELS:
                print(f"{spec}: agent process, {args.rounds} rounds...", file=sys.stderr)
                models[spec] = measure_model(spec, data, args, port, workdir, public)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "benchmark": "torch_trainer_cost",
        "timestamp": timestamp(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "no_docs")},
        "dataset": {
            "name": "sklearn digits (70/30 split)",
            "train_examples": len(x_train),
            "test_examples": len(x_test),
        },
        "imports": imports,
        "models": models,
        "environment": environment(["fedge", "torch", "numpy", "paho-mqtt"]),
    }
    print(format_table(result))
    write_json(args.out, result)
    if not args.no_docs:
        write_doc_section(DOCS, docs_section(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
