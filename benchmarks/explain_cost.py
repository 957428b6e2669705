"""Benchmark: what one explanation (``Agent.explain``, ``POST /v1/explain``) costs.

The model is the one ``benchmarks/agent_overhead.py`` builds: the digits MLP
64-512-512-10, int8 static, signed by ``package_model``, whose manifest carries a
reference profile (64 features: the baseline is each feature's reference median).
It is loaded as the agent loads it (``OnnxRuntimeModel``) and served by one
:class:`edge_agent.serving.server.ModelServer` with a ``ServingMonitor``, as on the
agent. Three calls, interleaved per iteration (rotating order) after a warm-up, on
test rows of the digits split:

* **predict 1**: ``ModelServer.predict`` of one row (the baseline);
* **explain**: ``ModelServer.explain`` of one row: 64 occlusion groups, 66 rows in
  one runtime call, validation and the answer included;
* **predict 66**: ``ModelServer.predict`` of 66 rows (the same model work as an
  explanation, without building the occluded rows).

Prints a table and writes JSON::

    python benchmarks/explain_cost.py --out benchmarks/results/explain_cost.json
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
from _support import argument_parser, environment, write_json
from agent_overhead import build_model, stats_us

from compress.artifact import read_artifact_unverified
from edge_agent.monitoring import ServingMonitor
from edge_agent.monitoring.explain import MAX_EVALUATIONS
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from edge_agent.serving.server import LoadedModel, ModelServer

DEFAULT_OUT = Path("benchmarks/results/explain_cost.json")
SIDES = ("predict 1", "explain", f"predict {MAX_EVALUATIONS}")


def _server(payload: bytes, artifact: Path) -> ModelServer:
    manifest = read_artifact_unverified(artifact)[0].manifest
    server = ModelServer(monitor=ServingMonitor())
    server.activate(
        LoadedModel(
            name=manifest.name,
            version=manifest.version,
            sha256=manifest.sha256,
            format="onnx",
            slot="a",
            runtime=OnnxRuntimeModel.from_bytes(payload),
            installed_at=0.0,
            manifest=manifest,
        )
    )
    return server


def _measure(
    server: ModelServer, rows: np.ndarray, picks: np.ndarray, warmup: int
) -> dict[str, list[float]]:
    """Per side, the µs of each call; sides interleaved in rotating order."""
    calls: dict[str, Callable[[int], Any]] = {
        SIDES[0]: lambda i: server.predict(rows[i : i + 1]),
        SIDES[1]: lambda i: server.explain(rows[i : i + 1]),
        SIDES[2]: lambda i: server.predict(
            np.take(rows, range(i, i + MAX_EVALUATIONS), axis=0, mode="wrap")
        ),
    }
    samples: dict[str, list[float]] = {side: [] for side in SIDES}
    for n, i in enumerate(picks):
        for side in SIDES[n % 3 :] + SIDES[: n % 3]:
            start = time.perf_counter()
            calls[side](int(i))
            elapsed = (time.perf_counter() - start) * 1e6
            if n >= warmup:
                samples[side].append(elapsed)
    return samples


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--runs", type=int, default=1000, help="timed calls per side")
    parser.add_argument("--warmup", type=int, default=100, help="untimed calls per side first")
    args = parser.parse_args(argv)
    if args.runs < 20 or args.warmup < 0:
        parser.error("need --runs >= 20 and --warmup >= 0")
    workdir = Path(tempfile.mkdtemp(prefix="fedge-bench-explain-"))
    try:
        model = build_model(workdir, args.seed)
        server = _server(model.payload, model.artifact)
        rows = model.rows
        picks = np.random.default_rng(args.seed).integers(0, len(rows), args.warmup + args.runs)
        print(f"{args.runs} interleaved calls per side...", file=sys.stderr)
        samples = _measure(server, rows, picks, args.warmup)
        example = server.explain(rows[:1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    latency: dict[str, Any] = {side: stats_us(samples[side]) for side in SIDES}
    latency["explain_ratio_p50_to_predict_1"] = round(
        latency["explain"]["p50"] / latency[SIDES[0]]["p50"], 2
    )
    lines = ["µs per call            p50      p95     mean"]
    for side in SIDES:
        f = latency[side]
        lines.append(f"{side:<18} {f['p50']:>8.1f} {f['p95']:>8.1f} {f['mean']:>8.1f}")
    lines.append(f"explain / predict 1 (p50): {latency['explain_ratio_p50_to_predict_1']}")
    lines.append(
        f"one explanation: {example.evaluations} evaluations in {example.calls} call(s), "
        f"baseline {example.baseline}, groups {example.groups}"
    )
    print("\n".join(lines))
    write_json(
        args.out,
        {
            "benchmark": "explain_cost",
            "model": "digits MLP 64-512-512-10, int8 static (package_model), profile: "
            "64 features, 10 classes",
            "settings": {
                "runs": args.runs,
                "warmup": args.warmup,
                "seed": args.seed,
                "unit": "microseconds per ModelServer call (what Agent.predict / explain run)",
            },
            "latency_us": latency,
            "explanation": {
                "evaluations": example.evaluations,
                "calls": example.calls,
                "groups": list(example.groups),
                "baseline": example.baseline,
            },
            "environment": environment(["numpy", "onnxruntime"]),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
