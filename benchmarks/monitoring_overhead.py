"""Benchmark: what input validation and window summaries cost per prediction, and in telemetry.

The model is the one ``benchmarks/agent_overhead.py`` builds: the digits MLP
64-512-512-10, int8 static, signed by ``package_model``, whose manifest now carries
a reference profile (64 features, 10 classes, max-prob confidence). The payload is
loaded as the agent loads it (``OnnxRuntimeModel``) and served by
:class:`edge_agent.serving.server.ModelServer` -- ``Agent.predict`` is a direct call
to it -- three ways, interleaved per iteration (rotating order) after a warm-up:

* **plain**: the model activated without its manifest and no monitor: what
  ``Agent.predict`` did before monitoring (conversion, run, labels);
* **validated**: with its manifest (shape, dtype, NaN/inf and value-range checks);
* **monitored**: with its manifest and a ``ServingMonitor``: validation plus the
  window summary (features, bins, class and confidence counts), as the agent runs.

At batch 1 and at batch ``--batch``, on test rows of the digits split. Then the
telemetry bytes of one window: the encoded ``TelemetryBatch`` payload (one record,
as the agent publishes) without a summary, with the summary the monitored run
produced, and with the largest summary the wire allows (64 features, 100 classes,
every count saturated).

Prints a table and writes JSON::

    python benchmarks/monitoring_overhead.py --out benchmarks/results/monitoring_overhead.json
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _support import argument_parser, environment, write_json
from agent_overhead import build_model, stats_us

from compress.artifact import read_artifact_unverified
from edge_agent.monitoring import ServingMonitor
from edge_agent.protocol import InvalidCounts, TelemetryBatch, WindowSummary, encode
from edge_agent.protocol.messages_summary import MAX_CELL
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from edge_agent.serving.server import LoadedModel, ModelServer
from edge_agent.serving.telemetry import TelemetryCollector

DEFAULT_OUT = Path("benchmarks/results/monitoring_overhead.json")
SIDES = ("plain", "validated", "monitored")


def _servers(payload: bytes, artifact: Path) -> tuple[dict[str, ModelServer], ServingMonitor]:
    """The three model servers on one runtime (the same loaded model bytes)."""
    manifest = read_artifact_unverified(artifact)[0].manifest
    runtime = OnnxRuntimeModel.from_bytes(payload)

    def loaded(with_manifest: bool) -> LoadedModel:
        return LoadedModel(name=manifest.name, version=manifest.version, sha256=manifest.sha256,
                           format="onnx", slot="a", runtime=runtime, installed_at=0.0,
                           manifest=manifest if with_manifest else None)  # fmt: skip

    monitor = ServingMonitor()
    servers = {
        "plain": ModelServer(),
        "validated": ModelServer(),
        "monitored": ModelServer(monitor=monitor),
    }
    servers["plain"].activate(loaded(False))
    servers["validated"].activate(loaded(True))
    servers["monitored"].activate(loaded(True))
    return servers, monitor


def _measure(
    servers: dict[str, ModelServer], batches: list[npt.NDArray[np.float32]], warmup: int
) -> dict[str, list[float]]:
    """Per side, the µs of each call; sides interleaved in rotating order."""
    calls: dict[str, Callable[[npt.NDArray[np.float32]], Any]] = {
        side: servers[side].predict for side in SIDES
    }
    samples: dict[str, list[float]] = {side: [] for side in SIDES}
    for i, batch in enumerate(batches):
        order = SIDES[i % 3 :] + SIDES[: i % 3]
        for side in order:
            start = time.perf_counter()
            calls[side](batch)
            elapsed = (time.perf_counter() - start) * 1e6
            if i >= warmup:
                samples[side].append(elapsed)
    return samples


def _latency(samples: dict[str, list[float]]) -> dict[str, Any]:
    figures: dict[str, Any] = {side: stats_us(samples[side]) for side in SIDES}
    plain = figures["plain"]["p50"]
    for side in ("validated", "monitored"):
        figures[f"{side}_ratio_p50"] = round(figures[side]["p50"] / plain, 3)
        figures[f"{side}_added_us_p50"] = round(figures[side]["p50"] - plain, 2)
    return figures


def _telemetry_bytes(summary: WindowSummary) -> dict[str, int]:
    """Encoded TelemetryBatch bytes of one window: no summary, this one, the largest."""
    collector = TelemetryCollector(clock=time.time)
    record = collector.close_window(model="digits", version=1)
    worst = WindowSummary(
        n=2**32 - 1,
        features=((MAX_CELL,) * 10,) * 64,
        confidence=(MAX_CELL,) * 10,
        classes=(MAX_CELL,) * 100,
        invalid=InvalidCounts(*(2**32 - 1,) * 4),
    )

    def size(with_summary: WindowSummary | None) -> int:
        rec = record if with_summary is None else _with(record, with_summary)
        return len(encode(TelemetryBatch(seq=1, records=(rec,)), sender="pi-1", sent_at=0.0))

    return {
        "without_summary": size(None),
        "with_summary": size(summary),
        "with_largest_summary": size(worst),
        "summary_json": summary.encoded_size(),
        "largest_summary_json": worst.encoded_size(),
    }


def _with(record: Any, summary: WindowSummary) -> Any:
    import dataclasses  # noqa: PLC0415 - only here

    return dataclasses.replace(record, summary=summary)


def _table(latency: dict[str, dict[str, Any]], sizes: dict[str, int]) -> str:
    lines = ["per prediction (µs)      p50       p95      mean   ratio p50 to plain"]
    for batch, figures in latency.items():
        for side in SIDES:
            ratio = "" if side == "plain" else f"{figures[f'{side}_ratio_p50']:>10.3f}"
            f = figures[side]
            lines.append(
                f"{batch:>8} {side:<10} {f['p50']:>9.1f} {f['p95']:>9.1f} {f['mean']:>9.1f} {ratio}"
            )
    lines.append("telemetry window (bytes, encoded TelemetryBatch of one record)")
    for key, value in sizes.items():
        lines.append(f"  {key:<22} {value:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--runs", type=int, default=3000, help="timed calls per side and batch")
    parser.add_argument("--warmup", type=int, default=300, help="untimed calls per side first")
    parser.add_argument("--batch", type=int, default=32, help="the larger batch size")
    args = parser.parse_args(argv)
    if args.runs < 20 or args.warmup < 0 or args.batch < 2:
        parser.error("need --runs >= 20, --warmup >= 0 and --batch >= 2")
    workdir = Path(tempfile.mkdtemp(prefix="fedge-bench-monitoring-"))
    try:
        model = build_model(workdir, args.seed)
        servers, monitor = _servers(model.payload, model.artifact)
        rows = model.rows
        rng = np.random.default_rng(args.seed)
        latency = {}
        for batch in (1, args.batch):
            picks = rng.integers(0, len(rows), size=(args.warmup + args.runs, batch))
            print(f"batch {batch}: {args.runs} interleaved calls per side...", file=sys.stderr)
            latency[f"batch {batch}"] = _latency(
                _measure(servers, [rows[p] for p in picks], args.warmup)
            )
            summary = monitor.close("digits", 1, servers["monitored"].active.profile)  # type: ignore[union-attr]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert summary is not None
    sizes = _telemetry_bytes(summary)
    print(_table(latency, sizes))
    write_json(
        args.out,
        {
            "benchmark": "monitoring_overhead",
            "model": "digits MLP 64-512-512-10, int8 static (package_model), profile: "
            "64 features, 10 classes",
            "settings": {
                "runs": args.runs,
                "warmup": args.warmup,
                "batch": args.batch,
                "seed": args.seed,
                "unit": "microseconds per ModelServer.predict call (what Agent.predict runs)",
            },
            "latency": latency,
            "telemetry_bytes": sizes,
            "environment": environment(["numpy", "onnxruntime"]),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
