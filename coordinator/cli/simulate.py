"""``fedge simulate``: a whole fleet on this machine, from data to a rolled-out model.

With no arguments: an embedded MQTT broker, throwaway keys, 20 real agents with
Dirichlet(0.5) slices of the digits dataset (for fleets too big for digits, a synthetic
set sized for the fleet: the summary's ``data`` line says which), 20 rounds of FedAvg,
the final model packaged as a signed int8 artifact and rolled out (canary first) to
every agent. ``--model zoo:small_cnn --dataset digits-images`` (or your own PyTorch
factory, ``--model mymodels:cnn``) federates a PyTorch model instead; ``--task`` and
``--dataset`` cover regression and anomaly detection too. The run directory
(``--out``, default ``runs/<timestamp>``) keeps ``report.json``, ``report.png``, the
artifact, the final weights and every agent's data directory. ``--robust`` aggregates
as ``fedge train --robust`` does (updates clipped to the round's medians). See
:mod:`coordinator.sim.simulate` for the steps.

``--scenario drift`` runs the monitoring loop instead (:mod:`coordinator.scenario.drift_loop`):
the coordinator service with a retraining policy, 6 agents serving a digits model
and predicting on their data every second, a covariate shift on a share of them,
detection, retraining, rollout and recovery on one time axis in ``report.json`` and
``report.png``; ``--scenario control`` is the same run without the shift. ``--seed``,
``--out``, ``--ticks`` and ``--json`` apply; the other options do not.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.cli import training_options as run_options
from coordinator.cli.output import console, err_console, human_bytes, print_json, reported_errors
from coordinator.cli.round_table import rounds_table
from coordinator.federated.runs import RoundReport
from coordinator.federated.strategies import parse_strategy_args
from coordinator.scenario.drift_loop import SCENARIOS, ScenarioConfig, run_scenario
from coordinator.sim.simulate import SimulationConfig, SimulationReport, run_simulation

__all__ = ["simulate"]

logger = logging.getLogger(__name__)


def _default_out() -> Path:
    return Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def simulate(
    agents: Annotated[int, typer.Option(min=1, help="Agents (each a real fedge agent).")] = 20,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 20,
    dataset: Annotated[
        str,
        typer.Option(
            help="auto (digits, or synthetic sized for the fleet when digits is too small), "
            "digits, synthetic[:n_samples,n_features,n_classes] (bare: sized for the fleet), "
            "a real dataset shipped in a package (digits-images, mnist, japanese-vowels, "
            "ucr-anomaly, diabetes; pip install 'fedge[datasets]'), or PATH.npz (x of shape "
            "(n, ...); y class indices, float targets, or none for reconstruction)."
        ),
    ] = "auto",
    partition: Annotated[
        str,
        typer.Option(
            help="How data is split over agents: iid, dirichlet:ALPHA, shards:K, natural "
            "(by the dataset's own groups)."
        ),
    ] = "dirichlet:0.5",
    model: Annotated[
        str,
        typer.Option(
            help="mlp or softmax (built in, numpy), or a PyTorch model factory module:function "
            "(importable from the current directory, e.g. mymodels:cnn) or zoo:NAME "
            "(small_cnn, sensor_cnn, dense_autoencoder, mlp_regressor); needs fedge[torch]."
        ),
    ] = "mlp",
    task: Annotated[
        str | None,
        typer.Option(
            help="classification, regression or reconstruction (default: the dataset's task, "
            "or the factory's `task` attribute)."
        ),
    ] = None,
    strategy: Annotated[str, typer.Option(help="Flower strategy (see fedge train).")] = "fedavg",
    strategy_arg: Annotated[
        list[str] | None, typer.Option("--strategy-arg", help="key=value; repeatable.")
    ] = None,
    codec: Annotated[str, typer.Option(help="Update codec (see fedge train).")] = "fp32",
    dropout: Annotated[
        float,
        typer.Option(min=0.0, max=0.99, help="Share of agents dropping offline in each round."),
    ] = 0.0,
    broker: Annotated[
        str | None,
        typer.Option(help="Use this broker (mqtt://host:port) instead of the embedded one."),
    ] = None,
    broker_password_format: Annotated[
        str | None,
        typer.Option(
            help="With --broker: each agent's MQTT password, '{user}' replaced by its id "
            "(for brokers with fedge's ACL and one password per device).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of data, sampling and training.")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default runs/<timestamp>).")
    ] = None,
    hidden: Annotated[int, typer.Option(min=1, help="MLP hidden units.")] = 64,
    epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 2,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate of local training.")] = 0.05,
    optimizer: Annotated[str, typer.Option(help="Local optimizer: sgd or adam.")] = "sgd",
    batch_size: Annotated[int, typer.Option(min=1, help="Local mini-batch size.")] = 16,
    round_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per round.")] = 30.0,
    robust: Annotated[bool, run_options.ROBUST] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print report.json instead.")] = False,
    scenario: Annotated[
        str | None,
        typer.Option(
            help="drift: the monitoring loop (shift, detection, retraining, rollout, "
            "recovery); control: the same run without the shift. Options: " + ", ".join(SCENARIOS)
        ),
    ] = None,
    ticks: Annotated[
        int, typer.Option(min=2, help="With --scenario: most one-second ticks of the run.")
    ] = 120,
) -> None:
    """Simulate a fleet on this machine: train federated, package, roll out, report."""
    if scenario is not None:
        _scenario(scenario, out=out, seed=seed, ticks=ticks, as_json=as_json)
        return
    with reported_errors(as_json=as_json):
        config = SimulationConfig(
            out=out or _default_out(),
            agents=agents,
            rounds=rounds,
            dataset=dataset,
            partition=partition,
            strategy=strategy,
            strategy_args=parse_strategy_args(strategy_arg or []),
            codec=codec,
            dropout=dropout,
            broker=broker,
            broker_password_format=broker_password_format,
            seed=seed,
            hidden=hidden,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            batch_size=batch_size,
            round_timeout_s=round_timeout,
            model=model,
            task=task,
            robust=robust,
        )
        report = run_simulation(config) if as_json else _run_live(config)
    body = report.to_json()
    if as_json:
        print_json(body)
    else:
        _summary(report, body)
    if not body["rollout"].get("all_serving") or not body["rounds_ok"]:
        raise typer.Exit(1)


def _scenario(
    name: str,
    *,
    out: Path | None,
    seed: int,
    ticks: int,
    as_json: bool,
) -> None:
    """``--scenario``: run it, print its summary; exit 1 when the loop did not close
    (drift: no recovery) or the control run raised an alarm."""
    with reported_errors(as_json=as_json):
        config = ScenarioConfig(out=out or _default_out(), scenario=name, seed=seed, ticks=ticks)

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if not as_json:
                label = data.get("event") or data.get("name")
                err_console.print(f"[dim]{kind}[/dim] {label} {data.get('tick', '')}")

        report = run_scenario(config, on_event=on_event)
    summary = report["summary"]
    if as_json:
        print_json(report)
    else:
        table = Table(title=f"fedge simulate --scenario {name}", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in summary.items():
            table.add_row(key.replace("_", " "), f"{value:.4f}" if isinstance(value, float)
                          else str(value))  # fmt: skip
        table.add_row("report", f"{config.out / 'report.json'}, {config.out / 'report.png'}")
        console.print(table)
    failed = summary.get("false_alarms", 0) if name == "control" else not summary["recovered"]
    if failed:
        raise typer.Exit(1)


def _run_live(config: SimulationConfig) -> SimulationReport:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )
    rounds_task = progress.add_task("rounds", total=config.rounds)
    round_task = progress.add_task("round 1", total=config.agents)
    rollout_tasks: dict[str, Any] = {}
    done: list[RoundReport] = []

    def view() -> Group:
        return Group(
            rounds_table([r.to_json() for r in done[-8:]], title="latest rounds"), progress
        )

    with Live(view(), console=err_console, refresh_per_second=8, transient=True) as live:

        def on_round(report: RoundReport, what: str) -> None:
            if what == "done":
                done.append(report)
                progress.update(rounds_task, completed=len(done))
                live.update(view())
                return
            parts = what.split()
            if len(parts) == 2 and "/" in parts[1]:
                finished, total = (int(v) for v in parts[1].split("/"))
                progress.update(round_task, description=f"round {report.round}: {parts[0]}",
                                completed=finished, total=total)  # fmt: skip
            else:
                progress.update(round_task, description=f"round {report.round}: {what}")

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "rollout":
                stage = data["stage"]
                if stage not in rollout_tasks:
                    rollout_tasks[stage] = progress.add_task(
                        f"rollout ({stage})", total=data["total"]
                    )
                progress.update(rollout_tasks[stage], completed=data["done"])
            elif kind == "phase":
                progress.update(round_task, description=data["name"])

        return run_simulation(config, on_event=on_event, on_round=on_round)


def _summary(report: SimulationReport, body: dict[str, Any]) -> None:
    console.print(rounds_table([r.to_json() for r in report.result.rounds], title="rounds"))
    table = Table(title="fedge simulate", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    config = report.config
    rollout = body["rollout"]
    rows = [
        ("agents", f"{config.agents} on {report.broker}"),
        ("data", body["data"]["summary"]),
        ("model", f"{config.model} ({body['task']})"),
        ("training", f"{config.strategy}, {config.codec}, {config.rounds} rounds"),
        (f"final {body['metric']}", _metric(body["metric"], body["final_metrics"])),
        ("centralized baseline", _metric(body["metric"], body["centralized_metrics"])),
        ("uplink per round", f"{human_bytes(int(body['uplink_bytes_per_round']))} "
                             f"(fp32: {human_bytes(int(body['fp32_uplink_bytes_per_round']))})"),
        ("seconds per round", f"{body['seconds_per_round']:.2f}"),
        ("rollout", f"v{rollout['version']}: {rollout['agents_updated']}/"
                    f"{rollout['agents_total']} agents serve it{_halted(rollout)}"),
        ("artifact", body["artifact"]),
        ("report", f"{config.out / 'report.json'}, {config.out / 'report.png'}"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def _metric(name: str, metrics: dict[str, float]) -> str:
    """A metric as people read it: accuracy in percent, others as numbers."""
    value = metrics.get(name)
    if value is None:
        return "not measured"
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4f}"


def _halted(rollout: dict[str, Any]) -> str:
    return f" ({rollout['halted']})" if "halted" in rollout else ""
