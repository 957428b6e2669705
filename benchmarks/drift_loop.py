"""Benchmark: time from drift onset to detection and to rollout completion (the scenario).

Runs ``fedge simulate --scenario drift`` (:mod:`coordinator.scenario.drift_loop`)
``--repeats`` times with different seeds and, with ``--control``, the control run
of the same number of ticks. Each run: the coordinator service and six real
agents in one process on the embedded broker, one telemetry window per agent per
``tick_s`` (1 s), a 90-degree rotation of the digits on 30 % of the devices from
the shift tick on. Figures per run: telemetry windows and seconds from the shift
to the policy's trigger (detection), seconds to the retrained model's rollout
completion, the served model's accuracy before and after (unshifted, shifted and
fleet post-shift traffic), and, for the control run, its false alarms. Prints a
table and writes JSON and a section of docs/benchmarks.md::

    python benchmarks/drift_loop.py --repeats 3 --control
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from _support import argument_parser, environment, load_text, write_doc_section, write_json

from coordinator.scenario.drift_loop import ScenarioConfig, run_scenario

DEFAULT_OUT = Path(__file__).parent / "results" / "drift_loop.json"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=3, help="drift runs (seeds 0..n-1)")
    parser.add_argument("--ticks", type=int, default=90, help="most ticks of a run")
    parser.add_argument("--shift-tick", type=int, default=10)
    parser.add_argument("--control", action="store_true", help="also run the control")
    args = parser.parse_args()

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.repeats):
            out = Path(tmp) / f"drift{seed}"
            config = ScenarioConfig(out=out, scenario="drift", ticks=args.ticks,
                                    shift_tick=args.shift_tick, seed=seed)  # fmt: skip
            runs.append(run_scenario(config))
        control = None
        if args.control:
            control = run_scenario(ScenarioConfig(out=Path(tmp) / "control", scenario="control",
                                                  ticks=args.ticks))  # fmt: skip
    settings = runs[0]["config"]
    print(f"{settings['agents']} agents, {len(runs[0]['shifted_devices'])} shifted (rotate 90), "
          f"tick {settings['tick_s']} s, {settings['rows_per_tick']} predictions/agent/tick, "
          f"policy PSI >= {settings['drift_psi']} for {settings['windows']} fleet scores, "
          f"run {settings['rounds']} rounds x {settings['epochs']} epochs")  # fmt: skip
    header = ("seed", "windows", "detect s", "rollout s", "v1 pre", "v1 post", "v2 post",
              "v2 fleet", "recovered")  # fmt: skip
    print("".join(f"{h:>11}" for h in header))
    rows = []
    for seed, run in enumerate(runs):
        s = run["summary"]
        row = (seed, s.get("detection_windows", "-"), s.get("detection_s", "-"),
               s.get("rollout_complete_s", "-"), _pct(s["accuracy_pre_shift_v1"]),
               _pct(s["accuracy_post_shift_v1"]), _pct(s["accuracy_post_final"]),
               _pct(s.get("accuracy_post_shift_fleet_final")), s["recovered"])  # fmt: skip
        rows.append(row)
        print("".join(f"{v!s:>11}" for v in row))
    detection = [r["summary"]["detection_s"] for r in runs if "detection_s" in r["summary"]]
    rollout = [r["summary"]["rollout_complete_s"] for r in runs
               if "rollout_complete_s" in r["summary"]]  # fmt: skip
    if control is not None:
        c = control["summary"]
        print(
            f"control ({control['ticks_run']} ticks): false alarms {c['false_alarms']}, "
            f"alarm ticks {c['drift_alarm_ticks']}, retraining runs {c['retraining_runs']}"
        )
    result = {
        "settings": settings | {"repeats": args.repeats},
        "runs": [
            {"seed": i, "summary": r["summary"], "events": r["events"]} for i, r in enumerate(runs)
        ],
        "control": None if control is None else control["summary"],
        "median_detection_s": statistics.median(detection) if detection else None,
        "median_rollout_complete_s": statistics.median(rollout) if rollout else None,
        "environment": environment(["numpy", "onnxruntime", "amqtt"]),
    }
    write_json(args.out, result)
    env = result["environment"]
    table = "\n".join("| " + " | ".join(str(v) for v in row) + " |" for row in rows)
    control_line = "" if control is None else (
        f"The control run ({control['ticks_run']} ticks, no shift): "
        f"{control['summary']['false_alarms']} false alarms, "
        f"{control['summary']['retraining_runs']} retraining runs.\n"
    )  # fmt: skip
    write_doc_section(
        Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md",
        f"""## The drift loop in simulation (`benchmarks/drift_loop.py`)

Measured on {env["timestamp"]} ({env["platform"]}, {env["cpu_count"]} CPUs, Python \
{env["python"]}; {load_text(env)}). Command: `{env["command"]}`

`fedge simulate --scenario drift`: {settings["agents"]} agents, \
{len(runs[0]["shifted_devices"])} of them shifted (digits rotated 90 degrees, inputs and \
local data) at tick {settings["shift_tick"]}; one telemetry window per agent per \
{settings["tick_s"]} s; policy: fleet PSI >= {settings["drift_psi"]} for \
{settings["windows"]} consecutive fleet scores; the run: {settings["rounds"]} rounds x \
{settings["epochs"]} epochs on all agents; rollout: canary then the rest, soak 2 s, \
default health gate. Accuracies in %: v1 on unshifted and shifted test rows, the \
final model on shifted rows and on the fleet's post-shift traffic.

| seed | windows to detect | s to detect | s to rollout complete | v1 pre | v1 post | \
final post (shifted) | final post (fleet) | recovered (fleet, 2 points) |
|---:|---:|---:|---:|---:|---:|---:|---:|---|
{table}

{control_line}Raw figures: `benchmarks/results/drift_loop.json`.
""",
    )


if __name__ == "__main__":
    main()
