"""``report.png`` of ``fedge simulate``: the task's metric and bytes per round.

:func:`plot_report` draws from the ``report.json`` body (see
:class:`coordinator.sim.simulate.SimulationReport`): the global model's test metric
per round (accuracy, MSE or ROC-AUC: the report's ``metric``) against the
centralized baseline, and the bytes sent up and down per round
against what fp32 updates would cost. :func:`plot_timeline` draws a scenario's
report (``fedge simulate --scenario``): the fleet's drift score against the policy's
threshold and the served model's accuracy on unshifted and shifted test rows, on
one time axis with the shift, trigger, retraining and rollout marked.
matplotlib comes with ``fedge[simulation]`` and is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_report", "plot_timeline"]


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Accuracy and bytes per round, as a PNG."""
    import matplotlib  # noqa: PLC0415 - the simulation extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rounds = [r["round"] for r in report["rounds"]]
    metric = report.get("metric", "accuracy")
    scale = 100.0 if metric == "accuracy" else 1.0
    values = [scale * (r.get("metrics", {}).get(metric) or r.get(metric) or 0.0)
              for r in report["rounds"]]  # fmt: skip
    baseline = report.get("centralized_metrics", {}).get(metric)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    config, data = report["config"], report["data"]
    fig.suptitle(
        f"fedge simulate: {config['agents']} agents, {config['strategy']}, {config['codec']}, "
        f"{data['dataset']} ({data['partition']})"
    )
    top.plot(rounds, values, marker="o", label="federated (global model)")
    if baseline is not None:
        top.axhline(scale * baseline, color="grey", linestyle="--", label="centralized baseline")
    top.set_ylabel("test accuracy (%)" if metric == "accuracy" else f"test {metric}")
    if metric == "accuracy":
        top.set_ylim(0, 100)
    top.grid(alpha=0.3)
    top.legend(loc="lower right")
    width = 0.4
    up = [r["uplink_bytes"] / 1024 for r in report["rounds"]]
    down = [r["downlink_bytes"] / 1024 for r in report["rounds"]]
    bottom.bar([r - width / 2 for r in rounds], up, width, label="up (devices -> coordinator)")
    bottom.bar([r + width / 2 for r in rounds], down, width, label="down (coordinator -> devices)")
    bottom.axhline(report["fp32_uplink_bytes_per_round"] / 1024, color="grey", linestyle="--",
                   label="fp32 updates up")  # fmt: skip
    bottom.set_ylabel("KiB per round")
    bottom.set_xlabel("round")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


EVENT_STYLE = {
    "shift": "tab:red", "trigger": "tab:orange", "run_start": "tab:purple",
    "run_end": "tab:brown", "rollout_start": "tab:cyan", "rollout_complete": "tab:green",
}  # fmt: skip


def plot_timeline(report: dict[str, Any], path: Path) -> None:
    """Drift, trigger, retraining and recovery per tick, as a PNG."""
    import matplotlib  # noqa: PLC0415 - the simulation extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ticks = report["timeline"]
    t = [row["t_s"] for row in ticks]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    summary = report["summary"]
    fig.suptitle(f"fedge simulate --scenario {report['scenario']}: "
                 f"{report['config']['agents']} agents, {len(report['shifted_devices'])} shifted, "
                 f"retraining runs {summary['retraining_runs']}")  # fmt: skip
    # A score over too few effective rows gets no severity: drawn apart, faint.
    for few, style in ((False, {}), (True, {"alpha": 0.4, "linestyle": "--"})):
        drift = [row["drift"] if row["drift"] is not None
                 and (row["severity"] == "insufficient") == few else float("nan")
                 for row in ticks]  # fmt: skip
        label = "fleet drift of the served version (PSI)" + (", too few rows" if few else "")
        top.plot(t, drift, color="tab:blue", label=label, **style)
    top.axhline(report["policy"]["drift_psi"], color="grey", linestyle="--",
                label="policy threshold")  # fmt: skip
    top.set_ylabel("drift score")
    top.grid(alpha=0.3)
    for name, key in (("unshifted test", "accuracy_pre"), ("shifted test", "accuracy_post")):
        values = [100 * row[key] if row[key] is not None else float("nan") for row in ticks]
        bottom.plot(t, values, label=f"served model, {name}")
    bottom.set_ylabel("accuracy (%)")
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("seconds")
    bottom.grid(alpha=0.3)
    for event in report["events"]:
        color = EVENT_STYLE.get(event["event"], "black")
        for axis in (top, bottom):
            axis.axvline(event["t_s"], color=color, linestyle=":", label=event["event"]
                         if axis is top else None)  # fmt: skip
    top.legend(loc="upper left", fontsize="small")
    bottom.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
