"""Benchmark: int8 against fp32 ONNX for every model of the torch zoo, on real data.

For each zoo model and the real dataset it is meant for
(:mod:`coordinator.sim.real_datasets`, data shipped inside installed wheels):

==================  ==================  ==============  =================================
model               dataset             task            metric
==================  ==================  ==============  =================================
small_cnn           digits-images       classification  accuracy (test set)
sensor_cnn          japanese-vowels     classification  accuracy (test set)
dense_autoencoder   ucr-anomaly         reconstruction  ROC-AUC of the anomaly score
mlp_regressor       diabetes            regression      MSE of the prediction
==================  ==================  ==============  =================================

the model is trained centrally for a few epochs with the device's own trainer
(:class:`edge_agent.training.torch_trainer.TorchTrainer`, one torch thread, seeded),
exported to float32 ONNX (:func:`compress.torch_export.export_torch_onnx`: what the
deployed model outputs) and quantized to int8 the way ``package_torch`` does it
(:func:`compress.quantize.quantize_int8`, static QDQ with the task's head kept in
float, calibrated on up to ``--calibration-size`` training examples drawn with the
seed). Reported per model:

* **size**: bytes of the fp32 and the int8 ONNX model, and the ratio;
* **metric**: the task's metric of the torch model (``TorchTrainer.predict``), of the
  fp32 ONNX model and of the int8 ONNX model on the test set, all computed by the same
  function (:mod:`compress.metrics` for MSE and ROC-AUC), and the change int8 - fp32;
* **latency**: one example (batch 1) through the agent's own runtime adapter
  (:class:`edge_agent.runtime.onnx_runtime.OnnxRuntimeModel`, ``--threads`` intra-op
  threads), median and 90th percentile over ``--runs`` timed calls after a warm-up,
  fp32 and int8 interleaved call by call over the test examples.

A dataset that is not installed is reported as "unavailable" with the install hint.
Prints a table and writes JSON (and, unless ``--no-docs``, its section of
``docs/benchmarks.md``)::

    python benchmarks/zoo_quantization.py --out benchmarks/results/zoo_quantization.json
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from _support import (
    DOCS,
    argument_parser,
    environment,
    load_text,
    timestamp,
    write_doc_section,
    write_json,
)

from compress.families import INPUT_NAME
from compress.metrics import mean_squared_error, roc_auc
from compress.quantize import quantize_int8
from compress.torch_export import OUTPUT_NAMES, export_torch_onnx, head_nodes
from coordinator.errors import RunError
from coordinator.sim.real_datasets import load_real_dataset
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from edge_agent.training.model_spec import ModelTask, parse_model_spec
from edge_agent.training.torch_models import build_module, initial_weights, load_module_weights
from edge_agent.training.torch_trainer import TorchTrainer
from edge_agent.training.trainer import Dataset, Optimizer, TrainConfig

DEFAULT_OUT = Path("benchmarks/results/zoo_quantization.json")
WARMUP_RUNS = 50
METRIC = {"classification": "accuracy", "regression": "mse", "reconstruction": "auc"}
"""The metric reported per task (higher is better except for MSE)."""


@dataclass(frozen=True)
class Workload:
    """One zoo model, its dataset and its central training settings."""

    model: str
    dataset: str
    epochs: int
    lr: float
    batch_size: int = 32
    optimizer: Optimizer = "adam"


WORKLOADS = (
    Workload("small_cnn", "digits-images", epochs=10, lr=0.003),
    Workload("sensor_cnn", "japanese-vowels", epochs=30, lr=0.003, batch_size=16),
    Workload("dense_autoencoder", "ucr-anomaly", epochs=30, lr=0.002),
    Workload("mlp_regressor", "diabetes", epochs=10, lr=0.01),
)


# --------------------------------------------------------------------------- metrics


def task_metric(task: ModelTask, outputs: npt.NDArray[Any], y: npt.NDArray[Any]) -> float:
    """Accuracy of probabilities / MSE of predictions / ROC-AUC of anomaly scores."""
    if task == "classification":
        return float(np.mean(np.argmax(outputs, axis=1) == y))
    if task == "regression":
        return mean_squared_error(outputs.reshape(y.shape), y)
    return roc_auc(outputs.reshape(-1), y)


# --------------------------------------------------------------------------- latency


def latencies_us(
    models: dict[str, OnnxRuntimeModel], x: npt.NDArray[np.float32], runs: int
) -> dict[str, list[float]]:
    """Batch-1 microseconds per model, interleaved call by call (rotating order)."""
    names = list(models)
    rows = [x[i % len(x)][np.newaxis].copy() for i in range(max(runs, WARMUP_RUNS))]
    for row in rows[:WARMUP_RUNS]:
        for name in names:
            models[name].run({INPUT_NAME: row})
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for i, row in enumerate(rows[:runs]):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            models[name].run({INPUT_NAME: row})
            times[name].append((clock() - start) * 1e6)
    return times


def p90(values: list[float]) -> float:
    """90th percentile."""
    return statistics.quantiles(values, n=10)[-1]


# --------------------------------------------------------------------------- one model


def measure(
    workload: Workload, *, seed: int, runs: int, threads: int, calibration_size: int
) -> dict[str, Any]:
    """Train, export, quantize and measure one zoo model (see the module docstring)."""
    data = load_real_dataset(workload.dataset, seed=seed)
    task = data.task
    spec = parse_model_spec(f"zoo:{workload.model}")
    shape = tuple(int(d) for d in data.x_train.shape[1:])
    outputs = data.num_outputs
    trainer = TorchTrainer(spec, task=task, input_shape=shape, num_outputs=outputs, num_threads=1)
    weights = initial_weights(spec, task=task, input_shape=shape, num_outputs=outputs, seed=seed)
    config = TrainConfig(
        epochs=workload.epochs, lr=workload.lr, batch_size=workload.batch_size,
        optimizer=workload.optimizer, seed=seed,
    )  # fmt: skip
    train = Dataset.from_arrays(data.x_train, data.y_train, task=task)
    print(f"{workload.model}: training on {len(train)} examples of {shape}...", file=sys.stderr)
    started = time.perf_counter()
    fitted = trainer.fit(weights, train, config, np.random.default_rng(seed))
    train_seconds = time.perf_counter() - started

    module = build_module(spec, input_shape=shape, num_outputs=outputs, task=task)
    load_module_weights(module, fitted.weights)
    module.eval()
    fp32 = export_torch_onnx(module, shape, task)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(data.x_train), min(calibration_size, len(data.x_train)), replace=False)
    calibration = data.x_train[np.sort(picked)]
    int8 = quantize_int8(fp32, calibration=calibration, float_nodes=head_nodes(fp32))

    sessions = {
        "fp32": OnnxRuntimeModel.from_bytes(fp32, threads=threads),
        "int8": OnnxRuntimeModel.from_bytes(int8, threads=threads),
    }
    output = OUTPUT_NAMES[task]
    x_test, y_test = data.x_test, data.y_test
    torch_out = trainer.predict(fitted.weights, x_test)
    onnx_out = {name: s.run({INPUT_NAME: x_test})[output] for name, s in sessions.items()}
    metric = {
        "torch": task_metric(task, torch_out, y_test),
        **{name: task_metric(task, out, y_test) for name, out in onnx_out.items()},
    }
    times = latencies_us(sessions, x_test, runs)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "model": workload.model,
        "spec": str(spec),
        "dataset": workload.dataset,
        "source": data.source,
        "target_scale": data.target_scale,
        "task": task,
        "sample_shape": list(shape),
        "num_outputs": outputs,
        "train_examples": len(train),
        "test_examples": len(x_test),
        "training": {
            "epochs": workload.epochs,
            "lr": workload.lr,
            "batch_size": workload.batch_size,
            "optimizer": workload.optimizer,
            "seconds": round(train_seconds, 2),
        },
        "fp32_bytes": len(fp32),
        "int8_bytes": len(int8),
        "size_ratio": round(len(fp32) / len(int8), 3),
        "metric_name": METRIC[task],
        "torch_metric": metric["torch"],
        "fp32_metric": metric["fp32"],
        "int8_metric": metric["int8"],
        "int8_minus_fp32": metric["int8"] - metric["fp32"],
        "max_abs_diff_fp32_onnx_vs_torch": float(
            np.max(np.abs(onnx_out["fp32"].reshape(torch_out.shape) - torch_out))
        ),
        "fp32_latency_us_median": round(median["fp32"], 2),
        "int8_latency_us_median": round(median["int8"], 2),
        "fp32_latency_us_p90": round(p90(times["fp32"]), 2),
        "int8_latency_us_p90": round(p90(times["int8"]), 2),
        "speedup_fp32_over_int8": round(median["fp32"] / median["int8"], 3),
    }


# --------------------------------------------------------------------------- output


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: size, metric and latency, fp32 beside int8."""
    header = (
        f"{'model':<18} {'dataset':<16} {'fp32 B':>9} {'int8 B':>9} {'ratio':>6} "
        f"{'metric':<8} {'torch':>8} {'fp32':>8} {'int8':>8} "
        f"{'fp32 us':>8} {'int8 us':>8} {'speedup':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"{r['model']:<18} {r['dataset']:<16} unavailable: {r['unavailable']}")
            continue
        lines.append(
            f"{r['model']:<18} {r['dataset']:<16} {r['fp32_bytes']:>9} {r['int8_bytes']:>9} "
            f"{r['size_ratio']:>6.2f} {r['metric_name']:<8} {r['torch_metric']:>8.4f} "
            f"{r['fp32_metric']:>8.4f} {r['int8_metric']:>8.4f} "
            f"{r['fp32_latency_us_median']:>8.1f} {r['int8_latency_us_median']:>8.1f} "
            f"{r['speedup_fp32_over_int8']:>7.2f}x"
        )
    return "\n".join(lines)


def docs_section(result: dict[str, Any]) -> str:
    """The ``zoo_quantization`` section of docs/benchmarks.md."""
    env = result["environment"]
    settings = result["settings"]
    lines = [
        "## int8 against fp32 ONNX for the torch zoo (`benchmarks/zoo_quantization.py`)",
        "",
        f"Measured on {result['timestamp']} ({env['platform']}, {env['cpu_count']} CPUs, "
        f"Python {env['python']}, torch {env['packages'].get('torch')}, onnxruntime "
        f"{env['packages'].get('onnxruntime')}; {load_text(env)}). Command: `{env['command']}`",
        "",
        "Each zoo model is trained centrally on its real dataset with `TorchTrainer` (one "
        "torch thread, Adam, seeded), exported to ONNX (`compress.torch_export`) and "
        "quantized to int8 with static calibration on "
        f"{settings['calibration_size']} training examples (`quantize_int8`, as "
        "`package_torch` does). The metric is computed on the test set by the same function "
        "for the torch model, the fp32 ONNX and the int8 ONNX model: accuracy "
        "(classification), MSE (regression, on the standardized target, lower is better), "
        "ROC-AUC of the anomaly score (reconstruction). Latency: one example (batch 1) "
        "through the agent's "
        f"`OnnxRuntimeModel` ({settings['threads']} thread), median over {settings['runs']} "
        "calls, fp32 and int8 interleaved.",
        "",
        "| model | dataset | epochs | fp32 bytes | int8 bytes | fp32/int8 | metric | torch "
        "| fp32 ONNX | int8 ONNX | fp32 µs | int8 µs | fp32/int8 latency |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['model']} | {r['dataset']} | unavailable: {r['unavailable']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['training']['epochs']} | {r['fp32_bytes']} "
            f"| {r['int8_bytes']} | {r['size_ratio']:.2f} | {r['metric_name']} "
            f"| {r['torch_metric']:.4f} | {r['fp32_metric']:.4f} | {r['int8_metric']:.4f} "
            f"| {r['fp32_latency_us_median']:.1f} | {r['int8_latency_us_median']:.1f} "
            f"| {r['speedup_fp32_over_int8']:.2f} |"
        )
    lines += [
        "",
        "A latency ratio below 1 means the int8 model is slower: on models this small the "
        "quantize/dequantize steps around each layer can cost more than the int8 arithmetic "
        "saves, and the size is the main gain. Raw figures: "
        "`benchmarks/results/zoo_quantization.json`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="data, training and sampling seed")
    parser.add_argument("--runs", type=int, default=500, help="timed batch-1 calls per model")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--calibration-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
    parser.add_argument(
        "--model", action="append", choices=[w.model for w in WORKLOADS],
        help="only these zoo models (repeatable; default: all)",
    )  # fmt: skip
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.runs < 10 or args.calibration_size < 1 or (args.epochs or 1) < 1:
        parser.error("need --runs >= 10, --calibration-size >= 1 and --epochs >= 1")

    torch.set_num_threads(1)  # the benchmark's own training: one thread, as on the devices
    rows: list[dict[str, Any]] = []
    for default in WORKLOADS:
        if args.model and default.model not in args.model:
            continue
        workload = replace(default, epochs=args.epochs or default.epochs)
        try:
            rows.append(
                measure(
                    workload,
                    seed=args.seed,
                    runs=args.runs,
                    threads=args.threads,
                    calibration_size=args.calibration_size,
                )
            )
        except RunError as exc:  # DatasetUnavailableError: the wheel is not installed
            rows.append(
                {"model": workload.model, "dataset": workload.dataset, "unavailable": str(exc)}
            )
        print(format_table(rows[-1:]), file=sys.stderr)

    print(format_table(rows))
    result = {
        "benchmark": "zoo_quantization",
        "timestamp": timestamp(),
        "settings": {
            "seed": args.seed,
            "runs": args.runs,
            "warmup_runs": WARMUP_RUNS,
            "threads": args.threads,
            "calibration_size": args.calibration_size,
            "latency": "batch 1 through OnnxRuntimeModel.run, microseconds, fp32 and int8 "
            "interleaved over the test examples",
        },
        "rows": rows,
        "environment": environment(["fedge", "torch", "onnx", "onnxruntime", "numpy"]),
    }
    write_json(args.out, result)
    if not args.no_docs:
        write_doc_section(DOCS, docs_section(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
