"""The options of a federated run, declared once for ``fedge train`` and ``fedge rounds start``.

Both commands run the same rounds (:func:`coordinator.federated.runs.run_training`):
``fedge rounds start`` through :class:`~coordinator.service.operations.Operations`
(``--api`` or in-process), ``fedge train`` in this process with its live table,
starting weights from a file, evaluation data, differential privacy and the
packaging of the result. Each option both take is one ``typer.Option`` here; the
commands give their own defaults (``rounds start`` leaves out what was not given,
so that the service's defaults apply)::

    rounds: Annotated[int, ROUNDS] = 20

The ``key=value`` options (``--strategy-arg``, ``--train-arg``) are read by
:func:`key_values`; ``--hidden`` by :func:`hidden_sizes`; ``--robust``,
``--max-examples-per-update`` and ``--norm-multiple`` (how far one device's update
can move the aggregate, :mod:`coordinator.federated.round_screen`) by
:func:`aggregation_settings`. Both commands put the model, aggregation and local
training settings into one
:attr:`RunRequest.config <coordinator.service.operations.RunRequest.config>` with
:func:`run_config` (and :func:`train_settings`).

``--model`` is a model name as before (a built-in ``--family`` then), or a PyTorch
model spec with a colon (``mypkg.models:cnn``, ``zoo:small_cnn``): the family is
then ``torch``, the name the spec's (``--name`` to change it), the task ``--task``
(default: the factory's ``task`` attribute, else classification) and the sizes
``--input-shape`` / ``--outputs`` (``fedge train`` reads them from ``--eval-data``
when left out). :func:`model_settings` turns these options into the request's
model keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click
import typer

from compress.families import FAMILIES
from coordinator.errors import StrategyError
from coordinator.federated.strategies import parse_strategy_args
from edge_agent.errors import UnknownModelError
from edge_agent.training.model_spec import TASKS, parse_model_spec

__all__ = [
    "BATCH_SIZE",
    "CLASSES",
    "CLIENTS_PER_ROUND",
    "CODEC",
    "EPOCHS",
    "FAMILY",
    "FEATURES",
    "HIDDEN",
    "INPUT_SHAPE",
    "LR",
    "MAX_EXAMPLES_PER_UPDATE",
    "MIN_CLIENTS",
    "MODEL",
    "NAME",
    "NORM_MULTIPLE",
    "OPTIMIZER",
    "OUTPUTS",
    "ROBUST",
    "ROUNDS",
    "ROUND_TIMEOUT",
    "SEED",
    "STRATEGY",
    "STRATEGY_ARG",
    "TASK",
    "TRAIN_ARG",
    "aggregation_settings",
    "hidden_sizes",
    "input_shape",
    "key_values",
    "model_settings",
    "run_config",
    "train_settings",
]

ROUNDS: Any = typer.Option("--rounds", min=1, help="Rounds to run.")
STRATEGY: Any = typer.Option(
    "--strategy",
    help="fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum, "
    "multikrum, bulyan, or module:Class (a Flower Message-API strategy).",
)
STRATEGY_ARG: Any = typer.Option(
    "--strategy-arg", help="key=value for the strategy (proximal_mu=0.1); repeatable."
)
CODEC: Any = typer.Option(
    "--codec", help="Update codec: fp32, fp16, int8, topk:D, topk:D+int8, topk:D+fp16."
)
MIN_CLIENTS: Any = typer.Option(
    "--min-clients", min=1, help="Fewest accepted updates for a round to count."
)
ROUND_TIMEOUT: Any = typer.Option(
    "--round-timeout", min=0.1, help="Seconds each round's devices have to reply."
)
MODEL: Any = typer.Option(
    "--model",
    help="Model name (devices keep per-model state), or a PyTorch model factory "
    "module:function (zoo:small_cnn, mypkg.models:cnn) importable here and installed "
    "on the devices.",
)
NAME: Any = typer.Option(
    "--name", help="Model name of a --model module:function (default: its name)."
)
TASK: Any = typer.Option(
    "--task",
    click_type=click.Choice(TASKS),
    help="Task of a --model module:function (default: the factory's task attribute, "
    "else classification).",
)
INPUT_SHAPE: Any = typer.Option(
    "--input-shape", help="Shape of one example for a --model module:function: 1,28,28."
)
OUTPUTS: Any = typer.Option(
    "--outputs", min=1, help="Classes or regression targets of a --model module:function."
)
FAMILY: Any = typer.Option("--family", click_type=click.Choice(FAMILIES), help="Model family.")
FEATURES: Any = typer.Option("--features", min=1, help="Input features.")
CLASSES: Any = typer.Option("--classes", min=2, help="Output classes.")
HIDDEN: Any = typer.Option(
    "--hidden", help="MLP hidden units: 64, or 128,64 for two layers (or repeat the option)."
)
CLIENTS_PER_ROUND: Any = typer.Option(
    "--clients-per-round", min=1, help="Devices sampled per round."
)
SEED: Any = typer.Option("--seed", min=0, help="Seed of sampling and training.")
EPOCHS: Any = typer.Option("--epochs", min=1, help="Local epochs per round.")
LR: Any = typer.Option("--lr", min=0.0, help="Local learning rate.")
BATCH_SIZE: Any = typer.Option("--batch-size", min=1, help="Local batch size.")
OPTIMIZER: Any = typer.Option("--optimizer", help="Local optimizer: sgd or adam.")
TRAIN_ARG: Any = typer.Option(
    "--train-arg", help="Extra key=value sent to devices (weight_decay=0.01); repeatable."
)
ROBUST: Any = typer.Option(
    "--robust",
    help="Clip every update to the round's median update norm and its weight to the "
    "median example count before aggregating (no device moves the model more than "
    "a median one).",
)
MAX_EXAMPLES_PER_UPDATE: Any = typer.Option(
    "--max-examples-per-update",
    min=1,
    help="Most examples one update weighs (also never more than its device announced; "
    "default 100000).",
)
NORM_MULTIPLE: Any = typer.Option(
    "--norm-multiple",
    min=1.0,
    help="Reject updates whose norm is over this multiple of the round's median "
    "update norm (with 3+ updates; default 10).",
)


def key_values(pairs: Sequence[str], *, option: str) -> dict[str, Any]:
    """Parse ``key=value`` pairs (:func:`~coordinator.federated.strategies.parse_strategy_args`:
    numbers and true/false are read as such, ``k-e-y`` is ``k_e_y``).

    Raises:
        typer.BadParameter: a pair without ``=`` or with an empty or invalid key.
    """
    try:
        return dict(parse_strategy_args(pairs))
    except StrategyError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def hidden_sizes(values: Sequence[str]) -> list[int]:
    """The hidden layer sizes of ``--hidden`` values (each one size or a comma list).

    Raises:
        typer.BadParameter: not positive integers.
    """
    sizes = []
    for value in values:
        for part in value.split(","):
            text = part.strip()
            if not text:
                continue
            if not text.isdigit() or int(text) < 1:
                raise typer.BadParameter(
                    f"{value!r} is not a comma-separated list of positive integers",
                    param_hint="--hidden",
                )
            sizes.append(int(text))
    return sizes


def input_shape(text: str | None) -> list[int] | None:
    """The ``--input-shape`` value: ``1,28,28`` -> ``[1, 28, 28]`` (None: not given).

    Raises:
        typer.BadParameter: not a comma-separated list of positive integers.
    """
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of positive integers (1,28,28)",
            param_hint="--input-shape",
        )
    return [int(part) for part in parts]


def model_settings(
    *,
    model: str | None,
    name: str | None,
    family: str | None,
    task: str | None,
    shape: str | None,
    outputs: int | None,
) -> dict[str, Any]:
    """The request's model keys of ``--model``, ``--name``, ``--family``, ``--task``,
    ``--input-shape`` and ``--outputs`` (those left out are omitted).

    A ``--model`` with a colon is a PyTorch model spec: ``model_spec`` (as given:
    the coordinator makes it canonical), ``model`` = ``--name`` or the spec's name;
    otherwise ``--model`` is the name of a built-in ``--family`` model.

    Raises:
        typer.BadParameter: a malformed spec, or an option that does not go with
            the kind of model (``--family`` with a spec; ``--name``, ``--input-shape``,
            ``--outputs`` or a task other than classification without one).
    """
    if model is not None and ":" in model:
        try:
            spec = parse_model_spec(model)
        except UnknownModelError as exc:
            raise typer.BadParameter(str(exc), param_hint="--model") from None
        if family is not None:
            raise typer.BadParameter(
                f"{model} is a PyTorch model; --family is for the built-in models",
                param_hint="--family",
            )
        settings = {
            "model": name or spec.name,
            "model_spec": model.strip(),
            "task": task,
            "input_shape": input_shape(shape),
            "num_outputs": outputs,
        }
        return {key: value for key, value in settings.items() if value is not None}
    torch_only = {"--name": name, "--input-shape": shape, "--outputs": outputs}
    given = [option for option, value in torch_only.items() if value is not None]
    if task not in (None, "classification"):
        given.append(f"--task {task}")
    if given:
        raise typer.BadParameter(
            f"{', '.join(given)} need(s) a PyTorch model: --model module:function",
            param_hint="--model",
        )
    settings = {"model": model, "family": family, "task": task}
    return {key: value for key, value in settings.items() if value is not None}


def aggregation_settings(
    robust: bool, max_examples_per_update: int | None, norm_multiple: float | None
) -> dict[str, Any]:
    """The request's aggregation keys of ``--robust``, ``--max-examples-per-update``
    and ``--norm-multiple`` (those left out, and ``robust`` when false, are omitted)."""
    given = {
        "robust": robust or None,
        "max_examples_per_update": max_examples_per_update,
        "norm_multiple": norm_multiple,
    }
    return {key: value for key, value in given.items() if value is not None}


def train_settings(
    epochs: int | None, lr: float | None, batch_size: int | None, optimizer: str | None
) -> dict[str, Any]:
    """The local training settings given as options (the others: the devices' defaults)."""
    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "optimizer": optimizer}
    return {key: value for key, value in given.items() if value is not None}


def run_config(
    *,
    model: dict[str, Any],
    features: int | None,
    classes: int | None,
    hidden: Sequence[int],
    clients_per_round: int | None,
    seed: int | None,
    strategy_args: dict[str, Any],
    train: dict[str, Any],
    aggregation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``RunRequest.config`` of the given settings (those left out are omitted);
    ``model`` is what :func:`model_settings` gave, ``aggregation``
    :func:`aggregation_settings`."""
    settings: dict[str, Any] = {
        **model,
        **(aggregation or {}),
        "features": features,
        "classes": classes,
        "hidden": list(hidden) or None,
        "clients_per_round": clients_per_round,
        "seed": seed,
        "strategy_args": strategy_args or None,
        "train": train or None,
    }
    return {key: value for key, value in settings.items() if value is not None}
