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
int8, signs and writes an artifact ready for ``fedge deploy`` (the keys are loaded,
and an encrypted key's password read from ``--key-password-file`` or asked for,
before the first round).

A PyTorch model: ``--model mypkg.models:cnn`` (or ``zoo:small_cnn``; the module
importable from the current directory or the Python path, and installed and allowed
on the devices that train it). Its name is the function's (``--name`` to change
it), its task ``--task`` or the factory's ``task`` attribute (else
classification); the shape of one example and the output count come from
``--eval-data`` (``x`` of shape (n, ...); ``y`` class labels: classes = largest
label + 1; regression targets (n,) or (n, k): 1 or k outputs; reconstruction: 0/1
anomaly flags) or from ``--input-shape`` and ``--outputs``. The summary then gives
the task's metrics (accuracy, MSE or ROC-AUC), and ``--package`` exports the
module to ONNX, quantizes it with the evaluation examples as calibration (the
normal ones for reconstruction), gates int8 against fp32 on the evaluation data and
signs it (:func:`~coordinator.delivery.torch_packaging.package_torch`).

The deployed-model gate (:mod:`coordinator.delivery.baseline`): with ``--baseline
ARTIFACT`` (the signed artifact deployed now; its signatures checked against
``--baseline-trust`` keys when given, ``--baseline-threshold`` of them) ``--package`` signs the new
int8 model only if it beats or matches the baseline on ``--eval-data`` with the
task's metric (within ``--baseline-tolerance``, 0 by default). The baseline is read
and measured before any round runs, so a baseline for another task or input shape
is refused at once, and so is a ``--version`` of the same model name that is not
above the baseline's (devices would refuse it as a rollback); a worse model is
refused with both figures (exit 1, nothing written) unless ``--allow-worse``.
Without ``--baseline`` the artifact is packaged as before, and the output and the
log say that no baseline was compared. The artifact's manifest carries its lineage
(:func:`~coordinator.federated.lineage.lineage_for_run`: rounds, strategy, codec,
participants, trigger ``manual``, the ``--baseline`` model as its parent). The
packaging and the baseline gate are :mod:`coordinator.cli.train_packaging`'s.

What it shares with ``fedge rounds start``: the options
(:mod:`coordinator.cli.training_options`), the
:class:`~coordinator.service.operations.RunRequest` they make, its reading into a
run and a strategy (:func:`~coordinator.service.runs.training_config`,
:func:`~coordinator.service.runs.run_strategy`, as the service does) and the rounds
themselves (:func:`~coordinator.federated.runs.run_training`). What stays its own,
because only this process holds it: the starting weights (``--init``) and
evaluation data (``--eval-data``) read from local files, the server-side
differential privacy wrapper (``--dp-clip``, ``--dp-noise``) and
``--max-update-norm``, the final global weights (which the service does not keep)
and what is done with them (``--out``, ``--package``). So it runs the rounds in the
foreground on its own connection to the broker, with no service and no database.

Exit status: 0 when at least one round succeeded, 1 otherwise (or on an error).
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
from flwr.serverapp.strategy import Strategy
from rich.console import Group
from rich.live import Live
from rich.text import Text

from compress.fileio import atomic_write
from compress.lineage import Trigger
from coordinator.cli import training_options as run_options
from coordinator.cli.key_loading import KeyPasswordFileOption
from coordinator.cli.model import load_weights
from coordinator.cli.options import Connection, JsonOption, with_broker
from coordinator.cli.output import console, err_console, human_bytes, print_json, reported_errors
from coordinator.cli.round_table import percent, rounds_table
from coordinator.cli.train_packaging import (
    NEEDS_EVAL_DATA,
    baseline_gate,
    package_run,
    signing_keys_for,
)
from coordinator.cli.training_options import (
    aggregation_settings,
    hidden_sizes,
    key_values,
    model_settings,
    run_config,
    train_settings,
)
from coordinator.delivery.lineage import parent_of
from coordinator.delivery.packaging import (
    load_labelled_npz,
)
from coordinator.errors import RunError
from coordinator.federated.lineage import lineage_for_run
from coordinator.federated.models import (
    PRIMARY_METRIC,
    ModelDef,
    model_task,
)
from coordinator.federated.runs import RoundReport, RunConfig, RunResult, run_training
from coordinator.federated.strategies import wrap_dp
from coordinator.federated.update_check import DEFAULT_MAX_UPDATE_NORM
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.service.operations import RunRequest
from coordinator.service.runs import run_strategy, training_config

__all__ = ["train"]

logger = logging.getLogger(__name__)


@contextmanager
def connected(connection: Connection) -> Iterator[MqttHub]:
    """A hub connected to the connection's broker, stopped on exit.

    Raises:
        ConfigError: bad broker settings or an unreadable password file.
        BrokerError: cannot connect.
    """
    hub = MqttHub(HubConfig(broker=connection.broker_config()))
    hub.start(connection.connect_timeout)
    try:
        yield hub
    finally:
        hub.stop()


def _load_init(init: Path) -> dict[str, npt.NDArray[np.float32]]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in load_weights(init).items()}


@with_broker
def train(
    connection: Connection,
    model: Annotated[str, run_options.MODEL],
    name: Annotated[str | None, run_options.NAME] = None,
    task: Annotated[str | None, run_options.TASK] = None,
    input_shape: Annotated[str | None, run_options.INPUT_SHAPE] = None,
    outputs: Annotated[int | None, run_options.OUTPUTS] = None,
    family: Annotated[str | None, run_options.FAMILY] = None,
    rounds: Annotated[int, run_options.ROUNDS] = 20,
    clients_per_round: Annotated[int, run_options.CLIENTS_PER_ROUND] = 10,
    min_clients: Annotated[int, run_options.MIN_CLIENTS] = 2,
    round_timeout: Annotated[float, run_options.ROUND_TIMEOUT] = 60.0,
    strategy: Annotated[str, run_options.STRATEGY] = "fedavg",
    strategy_arg: Annotated[list[str] | None, run_options.STRATEGY_ARG] = None,
    codec: Annotated[str, run_options.CODEC] = "fp32",
    epochs: Annotated[int, run_options.EPOCHS] = 1,
    lr: Annotated[float, run_options.LR] = 0.05,
    batch_size: Annotated[int, run_options.BATCH_SIZE] = 32,
    optimizer: Annotated[str, run_options.OPTIMIZER] = "sgd",
    train_arg: Annotated[list[str] | None, run_options.TRAIN_ARG] = None,
    robust: Annotated[bool, run_options.ROBUST] = False,
    max_examples_per_update: Annotated[int | None, run_options.MAX_EXAMPLES_PER_UPDATE] = None,
    norm_multiple: Annotated[float | None, run_options.NORM_MULTIPLE] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help=".npz with x (n, ...) and y (labels, regression targets or 0/1 anomaly "
            "flags): evaluate the global model here after each round (default: federated "
            "evaluation on the devices' held-out data).",
            dir_okay=False,
        ),
    ] = None,
    init: Annotated[
        Path | None, typer.Option(help="Starting weights (.npz with W0, b0, ...).", dir_okay=False)
    ] = None,
    hidden: Annotated[list[str] | None, run_options.HIDDEN] = None,
    features: Annotated[int | None, run_options.FEATURES] = None,
    classes: Annotated[int | None, run_options.CLASSES] = None,
    seed: Annotated[int, run_options.SEED] = 0,
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
    key_password_file: KeyPasswordFileOption = None,
    version: Annotated[int, typer.Option(min=1, help="Artifact version for --package.")] = 1,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="The deployed model's signed artifact: --package signs only a model that "
            "beats or matches it on --eval-data.",
            dir_okay=False,
        ),
    ] = None,
    baseline_tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="How much worse than --baseline the new model may be, in the task's "
            "metric (accuracy or ROC-AUC as a fraction, MSE).",
        ),
    ] = 0.0,
    allow_worse: Annotated[
        bool,
        typer.Option("--allow-worse", help="Package even a model worse than --baseline."),
    ] = False,
    trust: Annotated[
        list[Path] | None,
        typer.Option(
            "--baseline-trust",
            help="Public key --baseline must be signed by; repeatable.",
            dir_okay=False,
        ),
    ] = None,
    threshold: Annotated[
        int,
        typer.Option(
            "--baseline-threshold", min=1, help="How many --baseline-trust keys must sign."
        ),
    ] = 1,
    upload_dir: Annotated[
        Path | None,
        typer.Option(
            "--upload-dir",
            help="Where devices' chunked uploads are spooled on disk while they arrive "
            "(mode 0700; default: fedge-uploads-<uid> in the system's temporary directory).",
            file_okay=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run federated rounds over the online devices that have local data."""
    models = model_settings(
        model=model, name=name, family=family, task=task, shape=input_shape, outputs=outputs
    )
    torch_model = "model_spec" in models
    with reported_errors(as_json=as_json):
        chosen_task = model_task(model, task)  # a factory without --task is imported once
        if torch_model:
            models["task"] = chosen_task
            if eval_data is None and input_shape is None:
                raise RunError(f"give --eval-data, or --input-shape and --outputs, for {model}")
            if package is not None and eval_data is None:
                raise RunError(NEEDS_EVAL_DATA)
        elif init is None and eval_data is None and not (features and classes):
            raise RunError("give --init weights.npz, --eval-data, or --features and --classes")
        mlp = models.get("family", "mlp") == "mlp" and not torch_model
        request = RunRequest(
            rounds=rounds,
            strategy=strategy,
            codec=codec,
            min_clients=min(min_clients, clients_per_round),
            round_timeout_s=round_timeout,
            config=run_config(
                model=models,
                features=features,
                classes=classes,
                hidden=hidden_sizes(hidden or ()) if mlp else (),
                clients_per_round=clients_per_round,
                seed=seed,
                strategy_args=key_values(strategy_arg or (), option="--strategy-arg"),
                train=train_settings(epochs, lr, batch_size, optimizer)
                | key_values(train_arg or (), option="--train-arg"),
                aggregation=aggregation_settings(robust, max_examples_per_update, norm_multiple),
            ),
        )
        evaluation = None if eval_data is None else load_labelled_npz(eval_data, chosen_task)
        gate = baseline_gate(
            baseline,
            package=package,
            evaluation=evaluation,
            trust=trust or [],
            threshold=threshold,
            tolerance=baseline_tolerance,
            allow_worse=allow_worse,
        )
        config = training_config(
            request,
            initial_weights=None if init is None else _load_init(init),
            eval_data=evaluation,
            max_update_norm=max_update_norm,
        )
        config = dataclasses.replace(config, upload_dir=upload_dir)
        if gate is not None:
            gate.check_version(config.model, version)
        signing_keys = signing_keys_for(package, key or [], key_password_file)
        chosen = run_strategy(request, federated_eval=evaluation is None)
        if dp_clip is not None:
            chosen = wrap_dp(
                chosen,
                noise_multiplier=dp_noise,
                clipping_norm=dp_clip,
                num_sampled_clients=clients_per_round,
            )
        title = f"{config.model}: {strategy}, {codec}, {rounds} rounds"
        with connected(connection) as hub:
            result = _run(hub, chosen, config, title=title, live=not as_json)
        if out is not None:
            buffer = io.BytesIO()
            arrays: dict[str, Any] = dict(result.weights)
            np.savez(buffer, **arrays)
            atomic_write(out, buffer.getvalue())
        packaged = None
        if package is not None:
            packaged = package_run(
                result,
                model_def=config.definition,
                model=config.model,
                out=package,
                signing_keys=signing_keys,
                version=version,
                eval_data=evaluation,
                baseline=gate,
                lineage=lineage_for_run(
                    result,
                    trigger=Trigger.manual(),
                    parent=None if gate is None else parent_of(gate.baseline.manifest),
                    strategy=strategy,
                    codec=codec,
                ),
            )
    _report(result, config.definition, title=title, as_json=as_json, packaged=packaged, out=out)


def _run(
    hub: MqttHub, strategy: Strategy, config: RunConfig, *, title: str, live: bool
) -> RunResult:
    if not live:
        return run_training(hub, strategy, config)
    done: list[RoundReport] = []
    with Live(console=err_console, refresh_per_second=8, transient=True) as view:

        def show(report: RoundReport, what: str) -> None:
            if what == "done":
                done.append(report)
                status = Text("")
            else:
                status = Text(f"round {report.round}/{config.rounds}: {what}", style="cyan")
            view.update(Group(rounds_table([r.to_json() for r in done], title=title), status))

        return run_training(hub, strategy, config, on_round=show)


def _final(result: RunResult, model: ModelDef) -> str:
    """The final figure of the model's task: accuracy, MSE or ROC-AUC."""
    key = PRIMARY_METRIC[model.task]
    if key == "accuracy":
        return f"final accuracy {percent(result.final_accuracy)}"
    value = result.final_metrics.get(key)
    return f"final {key} {'-' if value is None else f'{value:.4g}'}"


def _report(
    result: RunResult,
    model: ModelDef,
    *,
    title: str,
    as_json: bool,
    packaged: str | None,
    out: Path | None,
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
        summary = result.to_json()
        console.print(rounds_table(summary["rounds"], title=title))
        console.print(
            f"{_final(result, model)}; "
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
