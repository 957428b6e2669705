"""``fedge train``: federated rounds over the fleet, with a live view.

Connects to the broker as the ``coordinator`` user, waits for devices that are
online and report local data, and runs ``--rounds`` rounds of a Flower strategy
through :func:`coordinator.federated.runs.run_training`. The live view (stderr) shows
every round so far: status, accepted replies of those sampled, accuracy, loss and
the MQTT bytes up and down; the final summary goes to stdout, or, with ``--json``,
``{"rounds": [...], "final_accuracy": ...}``.

The starting weights come from ``--init weights.npz`` or are initialised (seeded)
for ``--family`` with ``--hidden`` units and the feature/class counts of
``--eval-data`` (or ``--features`` / ``--classes``). ``--out`` saves the final
global weights; ``--package ARTIFACT --key KEY`` exports them to ONNX, quantizes to
int8, signs and writes an artifact ready for ``fedge deploy``.

Exit status: 0 when at least one round succeeded, 1 otherwise (or on an error).
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
from flwr.serverapp.strategy import Strategy
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from compress.families import FAMILIES, init_weights
from compress.fileio import atomic_write
from compress.keys import load_signing_key
from coordinator.cli.fleet import (
    BrokerOption,
    CaOption,
    CertOption,
    ConnectTimeoutOption,
    JsonOption,
    KeyOption,
    PasswordEnv,
    PasswordFileOption,
    UsernameOption,
    broker_config,
    connected,
)
from coordinator.cli.model import load_weights
from coordinator.cli.output import console, err_console, human_bytes, print_json, reported_errors
from coordinator.delivery.packaging import LabelledData, load_labelled_npz, package_weights
from coordinator.errors import RunError
from coordinator.federated.runs import RoundReport, RunConfig, RunResult, run_training
from coordinator.federated.strategies import build_strategy, parse_strategy_args, wrap_dp
from coordinator.federated.update_check import DEFAULT_MAX_UPDATE_NORM
from coordinator.link.hub import MqttHub
from edge_agent.protocol import COORDINATOR_SENDER

__all__ = ["train"]

logger = logging.getLogger(__name__)


def _initial_weights(
    family: str,
    init: Path | None,
    hidden: str,
    features: int | None,
    classes: int | None,
    eval_data: LabelledData | None,
    seed: int,
) -> dict[str, npt.NDArray[np.float32]]:
    if init is not None:
        return {k: np.asarray(v, dtype=np.float32) for k, v in load_weights(init).items()}
    if eval_data is not None:
        features = features or int(eval_data.x.shape[1])
        classes = classes or int(eval_data.y.max()) + 1
    if not features or not classes:
        raise RunError("give --init weights.npz, --eval-data, or --features and --classes")
    try:
        hidden_sizes = [int(h) for h in hidden.split(",") if h.strip()] if family == "mlp" else []
    except ValueError:
        raise RunError(f"--hidden must be comma-separated integers, got {hidden!r}") from None
    return init_weights(family, [features, *hidden_sizes, classes], np.random.default_rng(seed))


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def rounds_table(reports: list[RoundReport], *, title: str) -> Table:
    """The rounds so far, one row each."""
    table = Table(title=title, title_justify="left")
    for name in ("round", "status", "clients", "accuracy", "loss", "up", "down", "notes"):
        table.add_column(name, justify="right" if name not in ("status", "notes") else "left")
    for report in reports:
        notes = []
        if report.rejected:
            notes.append("rejected " + ",".join(f"{k}:{v}" for k, v in report.rejected.items()))
        if report.dropped:
            notes.append(f"{report.dropped} offline")
        if report.timed_out:
            notes.append(f"{report.timed_out} timed out")
        if report.reason:
            notes.append(report.reason)
        table.add_row(
            str(report.round),
            "[green]ok[/]" if report.status == "ok" else "[red]failed[/]",
            f"{report.clients}/{report.sampled}",
            _fmt(report.accuracy, percent=True),
            _fmt(report.loss),
            human_bytes(report.uplink_bytes),
            human_bytes(report.downlink_bytes),
            "; ".join(notes),
        )
    return table


def _package(
    result: RunResult,
    *,
    family: str,
    model: str,
    out: Path,
    keys: list[Path],
    version: int,
    eval_data: LabelledData | None,
) -> str:
    if not keys:
        raise RunError("--package needs at least one --key")
    packaged = package_weights(
        family,
        result.weights,
        name=model,
        version=version,
        keys=[load_signing_key(k) for k in keys],
        out=out,
        evaluation=eval_data,
        metadata={"trained": "federated", "rounds": str(len(result.rounds))},
        now=datetime.now(UTC),
    )
    return (
        f"wrote {out}: {model} v{version}, {packaged.manifest.quantization}, "
        f"{human_bytes(packaged.packaged_bytes)}"
    )


def train(
    broker: BrokerOption,
    model: Annotated[str, typer.Option(help="Model name (devices keep per-model state).")],
    family: Annotated[str, typer.Option(help=f"Model family: {', '.join(FAMILIES)}.")] = "mlp",
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to run.")] = 20,
    clients_per_round: Annotated[int, typer.Option(min=1, help="Devices sampled per round.")] = 10,
    min_clients: Annotated[
        int, typer.Option(min=1, help="Fewest accepted updates for a round to count.")
    ] = 2,
    round_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds each round's devices have to reply.")
    ] = 60.0,
    strategy: Annotated[
        str,
        typer.Option(
            help="fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum, "
            "multikrum, bulyan, or module:Class (a Flower Message-API strategy)."
        ),
    ] = "fedavg",
    strategy_arg: Annotated[
        list[str] | None,
        typer.Option("--strategy-arg", help="key=value for the strategy; repeatable."),
    ] = None,
    codec: Annotated[
        str, typer.Option(help="Update codec: fp32, fp16, int8, topk:D, topk:D+int8, topk:D+fp16.")
    ] = "fp32",
    epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 1,
    lr: Annotated[float, typer.Option(min=0.0, help="Local learning rate.")] = 0.05,
    batch_size: Annotated[int, typer.Option(min=1, help="Local batch size.")] = 32,
    optimizer: Annotated[str, typer.Option(help="Local optimizer: sgd or adam.")] = "sgd",
    train_arg: Annotated[
        list[str] | None,
        typer.Option("--train-arg", help="Extra key=value sent to devices; repeatable."),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help=".npz with x, y: evaluate the global model here after each round "
            "(default: federated evaluation on the devices' held-out data).",
            dir_okay=False,
        ),
    ] = None,
    init: Annotated[
        Path | None, typer.Option(help="Starting weights (.npz with W0, b0, ...).", dir_okay=False)
    ] = None,
    hidden: Annotated[str, typer.Option(help="MLP hidden units, comma-separated.")] = "64",
    features: Annotated[int | None, typer.Option(min=1, help="Input features.")] = None,
    classes: Annotated[int | None, typer.Option(min=2, help="Output classes.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of sampling and training.")] = 0,
    dp_clip: Annotated[
        float | None,
        typer.Option(min=0.0, help="Server-side DP: clip each update to this L2 norm."),
    ] = None,
    dp_noise: Annotated[
        float, typer.Option(min=0.0, help="Server-side DP: noise multiplier (with --dp-clip).")
    ] = 1.0,
    max_update_norm: Annotated[
        float, typer.Option(min=0.0, help="Reject updates with a larger L2 norm.")
    ] = DEFAULT_MAX_UPDATE_NORM,
    out: Annotated[
        Path | None, typer.Option("--out", help="Save the final global weights (.npz).")
    ] = None,
    package: Annotated[
        Path | None,
        typer.Option("--package", help="Write a signed int8 artifact of the final model."),
    ] = None,
    key: Annotated[
        list[Path] | None, typer.Option("--key", help="Signing key for --package; repeatable.")
    ] = None,
    version: Annotated[int, typer.Option(min=1, help="Artifact version for --package.")] = 1,
    username: UsernameOption = COORDINATOR_SENDER,
    password_file: PasswordFileOption = None,
    password: PasswordEnv = None,
    ca_file: CaOption = None,
    cert_file: CertOption = None,
    key_file: KeyOption = None,
    connect_timeout: ConnectTimeoutOption = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Run federated rounds over the online devices that have local data."""
    with reported_errors(as_json=as_json):
        if family not in FAMILIES:
            raise RunError(f"--family must be one of {', '.join(FAMILIES)}")
        evaluation = None if eval_data is None else load_labelled_npz(eval_data)
        weights = _initial_weights(family, init, hidden, features, classes, evaluation, seed)
        train_config: dict[str, int | float | str | bool] = {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "seed": seed,
        }
        train_config.update(parse_strategy_args(train_arg or []))
        config = RunConfig(
            model=model,
            family=family,
            initial_weights=weights,
            rounds=rounds,
            clients_per_round=clients_per_round,
            min_clients=min(min_clients, clients_per_round),
            round_timeout_s=round_timeout,
            codec=codec,
            train_config=train_config,
            eval_data=evaluation,
            seed=seed,
            max_update_norm=max_update_norm,
        )
        chosen = build_strategy(
            strategy, parse_strategy_args(strategy_arg or []), federated_eval=evaluation is None
        )
        if dp_clip is not None:
            chosen = wrap_dp(
                chosen,
                noise_multiplier=dp_noise,
                clipping_norm=dp_clip,
                num_sampled_clients=clients_per_round,
            )
        broker_settings = broker_config(
            broker, username=username, password=password, password_file=password_file,
            ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        )  # fmt: skip
        title = f"{model}: {strategy}, {codec}, {rounds} rounds"
        with connected(broker_settings, timeout=connect_timeout) as coordinator:
            result = _run(coordinator, chosen, config, title=title, live=not as_json)
        if out is not None:
            buffer = io.BytesIO()
            arrays: dict[str, Any] = dict(result.weights)
            np.savez(buffer, **arrays)
            atomic_write(out, buffer.getvalue())
        packaged = None
        if package is not None:
            packaged = _package(
                result, family=family, model=model, out=package, keys=key or [],
                version=version, eval_data=evaluation,
            )  # fmt: skip
    _report(result, title=title, as_json=as_json, packaged=packaged, out=out)


def _run(
    coordinator: MqttHub, strategy: Strategy, config: RunConfig, *, title: str, live: bool
) -> RunResult:
    if not live:
        return run_training(coordinator, strategy, config)
    done: list[RoundReport] = []
    with Live(console=err_console, refresh_per_second=8, transient=True) as view:

        def show(report: RoundReport, what: str) -> None:
            if what == "done":
                done.append(report)
                status = Text("")
            else:
                status = Text(f"round {report.round}/{config.rounds}: {what}", style="cyan")
            view.update(Group(rounds_table(done, title=title), status))

        return run_training(coordinator, strategy, config, on_round=show)


def _report(
    result: RunResult, *, title: str, as_json: bool, packaged: str | None, out: Path | None
) -> None:
    ok = any(r.status == "ok" for r in result.rounds)
    if as_json:
        body = result.to_json()
        body["ok"] = ok
        if out is not None:
            body["weights"] = str(out)
        if packaged is not None:
            body["artifact"] = packaged
        print_json(body)
    else:
        console.print(rounds_table(result.rounds, title=title))
        summary = result.to_json()
        console.print(
            f"final accuracy {_fmt(result.final_accuracy, percent=True)}; "
            f"{summary['rounds_ok']} round(s) ok, {summary['rounds_failed']} failed; "
            f"up {human_bytes(summary['uplink_bytes'])}, "
            f"down {human_bytes(summary['downlink_bytes'])}",
            highlight=False,
        )
        if out is not None:
            console.print(f"wrote the global weights to {out}", highlight=False)
        if packaged is not None:
            console.print(packaged, highlight=False)
    if not ok:
        raise typer.Exit(1)
