"""Benchmark: what int8 quantization costs and buys on a real (small) workload.

Trains two models centrally on scikit-learn's bundled digits dataset (the same
workload as the acceptance test in ``tests/test_quantize.py``, via
:mod:`coordinator.sim.datasets`):

* ``mlp``: a 64-512-512-10 ReLU MLP (scikit-learn, Adam);
* ``softmax``: multinomial logistic regression, 64-10.

Each is exported to ONNX (:func:`compress.onnx_export.export_onnx`) and quantized to
int8 both dynamically and statically (:func:`compress.quantize.quantize_int8`, static
calibration on rows drawn from the training set). For every pair it reports file
sizes, test accuracy of float32 and int8, the accuracy drop in percentage points, and
single-sample inference latency (batch of 1, median and 90th percentile over
``--runs`` timed calls after a warm-up) through the agent's own runtime
(:class:`edge_agent.runtime.onnx_runtime.OnnxRuntimeModel`, CPU, ``--threads``).

Prints a table and writes the figures as JSON::

    python benchmarks/quantization.py --out benchmarks/results/quantization.json
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime
from _support import argument_parser, machine_info, timestamp, write_json

from compress.families import INPUT_NAME
from compress.onnx_export import export_onnx
from compress.quantize import quantize_int8
from coordinator.sim.datasets import load_digits_split, train_reference_mlp, train_reference_softmax
from edge_agent.runtime.base import accuracy
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel

DEFAULT_OUT = Path("benchmarks/results/quantization.json")
WARMUP_RUNS = 20


@dataclass(frozen=True)
class Row:
    """One model x quantization mode."""

    model: str
    mode: str
    fp32_bytes: int
    int8_bytes: int
    ratio: float
    fp32_accuracy: float
    int8_accuracy: float
    drop_pp: float
    fp32_latency_us_median: float
    int8_latency_us_median: float
    fp32_latency_us_p90: float
    int8_latency_us_p90: float
    speedup: float


def latency_us(
    runtime: OnnxRuntimeModel, sample: npt.NDArray[np.float32], runs: int
) -> list[float]:
    """Wall-clock microseconds of ``runs`` single-sample ``run`` calls after a warm-up."""
    feeds = {INPUT_NAME: sample}
    for _ in range(WARMUP_RUNS):
        runtime.run(feeds)
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        runtime.run(feeds)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def p90(values: list[float]) -> float:
    """90th percentile."""
    return statistics.quantiles(values, n=10)[-1]


def benchmark_model(
    name: str,
    fp32: bytes,
    x_test: npt.NDArray[np.float32],
    y_test: npt.NDArray[np.int64],
    calibration: npt.NDArray[np.float32],
    *,
    runs: int,
    threads: int,
) -> list[Row]:
    """Quantize ``fp32`` both ways and measure each pair."""
    reference = OnnxRuntimeModel.from_bytes(fp32, threads=threads)
    fp32_acc = 100 * accuracy(reference, x_test, y_test)
    sample = x_test[:1]
    fp32_times = latency_us(reference, sample, runs)
    quantizers: dict[str, Callable[[], bytes]] = {
        "dynamic": lambda: quantize_int8(fp32),
        "static": lambda: quantize_int8(fp32, calibration=calibration),
    }
    rows = []
    for mode, quantize in quantizers.items():
        int8 = quantize()
        quantized = OnnxRuntimeModel.from_bytes(int8, threads=threads)
        int8_acc = 100 * accuracy(quantized, x_test, y_test)
        int8_times = latency_us(quantized, sample, runs)
        fp32_median = statistics.median(fp32_times)
        int8_median = statistics.median(int8_times)
        rows.append(
            Row(
                model=name,
                mode=mode,
                fp32_bytes=len(fp32),
                int8_bytes=len(int8),
                ratio=round(len(fp32) / len(int8), 3),
                fp32_accuracy=round(fp32_acc, 3),
                int8_accuracy=round(int8_acc, 3),
                drop_pp=round(fp32_acc - int8_acc, 3),
                fp32_latency_us_median=round(fp32_median, 2),
                int8_latency_us_median=round(int8_median, 2),
                fp32_latency_us_p90=round(p90(fp32_times), 2),
                int8_latency_us_p90=round(p90(int8_times), 2),
                speedup=round(fp32_median / int8_median, 3),
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    """A plain-text table of the rows."""
    header = (
        f"{'model':<8} {'mode':<8} {'fp32 B':>9} {'int8 B':>9} {'ratio':>6} "
        f"{'fp32 acc':>9} {'int8 acc':>9} {'drop pp':>8} "
        f"{'fp32 us':>8} {'int8 us':>8} {'speedup':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<8} {r.mode:<8} {r.fp32_bytes:>9} {r.int8_bytes:>9} {r.ratio:>6.2f} "
            f"{r.fp32_accuracy:>8.2f}% {r.int8_accuracy:>8.2f}% {r.drop_pp:>8.2f} "
            f"{r.fp32_latency_us_median:>8.1f} {r.int8_latency_us_median:>8.1f} "
            f"{r.speedup:>7.2f}x"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        **machine_info(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "timestamp": timestamp(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per model")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--calibration-size", type=int, default=256, help="training rows for static calibration"
    )
    args = parser.parse_args(argv)
    if args.runs < 2 or args.calibration_size < 1:
        parser.error("--runs must be >= 2 and --calibration-size >= 1")

    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    rng = np.random.default_rng(args.seed)
    size = min(args.calibration_size, len(x_train))
    calibration = x_train[rng.choice(len(x_train), size, replace=False)]
    print(f"digits: {len(x_train)} train / {len(x_test)} test rows; training...", file=sys.stderr)
    trained = {
        "mlp": export_onnx("mlp", train_reference_mlp(x_train, y_train, seed=args.seed)),
        "softmax": export_onnx(
            "softmax", train_reference_softmax(x_train, y_train, seed=args.seed)
        ),
    }
    rows: list[Row] = []
    for name, fp32 in trained.items():
        rows += benchmark_model(
            name, fp32, x_test, y_test, calibration, runs=args.runs, threads=args.threads
        )

    print(format_table(rows))
    result = {
        "benchmark": "quantization",
        "dataset": {
            "name": "sklearn digits",
            "train_rows": len(x_train),
            "test_rows": len(x_test),
            "seed": args.seed,
        },
        "settings": {
            "runs": args.runs,
            "warmup_runs": WARMUP_RUNS,
            "threads": args.threads,
            "calibration_rows": size,
            "latency": "one sample (batch of 1) through OnnxRuntimeModel.run, microseconds",
        },
        "environment": environment(),
        "rows": [asdict(r) for r in rows],
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
