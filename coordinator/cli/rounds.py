"""``fedge rounds``: federated runs over the fleet, started and watched.

* ``start`` asks the coordinator to run ``--rounds`` federated rounds with a
  Flower strategy over the devices that take part in training, in the
  background; it prints the run's id. The model settings go into
  :attr:`RunRequest.config <coordinator.service.operations.RunRequest.config>` under the
  keys :mod:`coordinator.service.runs` reads: ``model``, ``family``, ``features``,
  ``classes``, ``hidden`` (list of int: ``--hidden 128,64`` or one ``--hidden``
  per layer), or for a PyTorch model (``--model module:function``) ``model_spec``,
  ``task`` (``--task``), ``input_shape`` (``--input-shape 1,28,28``) and
  ``num_outputs`` (``--outputs``); ``clients_per_round``, ``seed``, ``strategy_args`` and ``train``
  (``--epochs``, ``--lr``, ``--batch-size``, ``--optimizer`` and the
  ``--train-arg key=value`` pairs sent to devices; numbers and true/false are
  read as such, ``lr=0.1`` is a number, else kept as text). Settings left out are
  the coordinator's defaults. The options are those of ``fedge train``
  (:mod:`coordinator.cli.training_options`), which builds the same
  :class:`~coordinator.service.operations.RunRequest` and runs the same rounds in
  its own process (see :mod:`coordinator.cli.train`).
* ``status [RUN_ID]``: a run's state and its rounds (accuracy, clients, bytes up
  and down); the latest run when no id is given.
* ``list``: every run, newest first.
* ``stop RUN_ID``: stops a running run; the round going on fails (``stopped by
  <token id>``) and the run ends ``interrupted``. It prints ``run RUN_ID: STATE``
  (rarely still ``running``, when the run's last step is slow to notice; it ends
  soon after). Meant for ``--api``: in-process no run outlives its command.

With ``--watch`` (``start`` and ``status``) the command follows the run in a live
view on stderr, polling every ``--interval`` seconds until it is no longer
``running``; it exits 0 if the run finished, 1 if it failed or was interrupted,
130 on Ctrl-C (the run goes on). Every command runs over ``--api`` or in-process
(:mod:`coordinator.cli.operate`); in-process, a run lasts only while the command
runs (the service marks it interrupted when it stops), so there ``start`` always
watches.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from coordinator.cli import training_options as run_options
from coordinator.cli.follow import (
    IntervalOption,
    WatchOption,
    announce,
    print_outcome,
    watch_and_exit,
)
from coordinator.cli.operate import operations, show_rows
from coordinator.cli.options import Connection, JsonOption, with_connection
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.cli.service_views import run_view, runs_table, to_json
from coordinator.cli.training_options import (
    aggregation_settings,
    hidden_sizes,
    key_values,
    model_settings,
    run_config,
    train_settings,
)
from coordinator.errors import NotFoundError
from coordinator.service.operations import CLI_ACTOR, Operations, RunRequest, RunView
from coordinator.service.store.records import RunState

__all__ = ["app"]

_DEFAULTS = RunRequest()
_ENDED = frozenset(state for state in RunState if state is not RunState.RUNNING)

app = typer.Typer(help="Federated runs: start one, follow its rounds.", no_args_is_help=True)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _report(view: RunView, *, as_json: bool) -> None:
    """Print ``run ID: STATE``, or the whole view with ``--json``."""
    print_outcome("run", view.run.run_id, view.run.state, view, as_json=as_json)


def _watch_and_exit(
    ops: Operations, connection: Connection, run_id: str, *, interval: float, as_json: bool
) -> None:
    """Follow a run until it finished (exit 0), failed or was interrupted (exit 1)."""
    watch_and_exit(
        lambda: ops.run(run_id),
        kind="run",
        key=run_id,
        state=lambda view: view.run.state,
        final=_ENDED,
        success=RunState.FINISHED,
        render=lambda view: run_view(view, now=time.time()),
        connection=connection,
        interval=interval,
        as_json=as_json,
        sleep=_sleep,
    )


@app.command("start")
@with_connection
def start(
    connection: Connection,
    rounds: Annotated[int, run_options.ROUNDS] = _DEFAULTS.rounds,
    strategy: Annotated[str, run_options.STRATEGY] = _DEFAULTS.strategy,
    codec: Annotated[str, run_options.CODEC] = _DEFAULTS.codec,
    min_clients: Annotated[int, run_options.MIN_CLIENTS] = _DEFAULTS.min_clients,
    round_timeout: Annotated[float, run_options.ROUND_TIMEOUT] = _DEFAULTS.round_timeout_s,
    model: Annotated[str | None, run_options.MODEL] = None,
    name: Annotated[str | None, run_options.NAME] = None,
    task: Annotated[str | None, run_options.TASK] = None,
    input_shape: Annotated[str | None, run_options.INPUT_SHAPE] = None,
    outputs: Annotated[int | None, run_options.OUTPUTS] = None,
    family: Annotated[str | None, run_options.FAMILY] = None,
    features: Annotated[int | None, run_options.FEATURES] = None,
    classes: Annotated[int | None, run_options.CLASSES] = None,
    hidden: Annotated[list[str] | None, run_options.HIDDEN] = None,
    clients_per_round: Annotated[int | None, run_options.CLIENTS_PER_ROUND] = None,
    seed: Annotated[int | None, run_options.SEED] = None,
    strategy_arg: Annotated[list[str] | None, run_options.STRATEGY_ARG] = None,
    epochs: Annotated[int | None, run_options.EPOCHS] = None,
    lr: Annotated[float | None, run_options.LR] = None,
    batch_size: Annotated[int | None, run_options.BATCH_SIZE] = None,
    optimizer: Annotated[str | None, run_options.OPTIMIZER] = None,
    train_arg: Annotated[list[str] | None, run_options.TRAIN_ARG] = None,
    robust: Annotated[bool, run_options.ROBUST] = False,
    max_examples_per_update: Annotated[int | None, run_options.MAX_EXAMPLES_PER_UPDATE] = None,
    norm_multiple: Annotated[float | None, run_options.NORM_MULTIPLE] = None,
    watch_: WatchOption = False,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Start a federated run in the background; prints the run's id.

    With --watch (always in-process), follows it and exits 0 only if it finishes.
    """
    config = run_config(
        model=model_settings(
            model=model, name=name, family=family, task=task, shape=input_shape, outputs=outputs
        ),
        features=features,
        classes=classes,
        hidden=hidden_sizes(hidden or ()),
        clients_per_round=clients_per_round,
        seed=seed,
        strategy_args=key_values(strategy_arg or (), option="--strategy-arg"),
        train=train_settings(epochs, lr, batch_size, optimizer)
        | key_values(train_arg or (), option="--train-arg"),
        aggregation=aggregation_settings(robust, max_examples_per_update, norm_multiple),
    )
    request = RunRequest(
        rounds=rounds,
        strategy=strategy,
        codec=codec,
        min_clients=min_clients,
        round_timeout_s=round_timeout,
        config=config,
    )
    watch_ = watch_ or connection.api is None
    with reported_errors(as_json=as_json), operations(connection) as ops:
        view = ops.start_run(request, actor=CLI_ACTOR)
        run_id = view.run.run_id
        if as_json and not watch_:
            print_json(to_json(view))
            return
        if not as_json:
            announce("run", run_id, status_command="fedge rounds status", watching=watch_)
        if watch_:
            _watch_and_exit(ops, connection, run_id, interval=interval, as_json=as_json)


@app.command("status")
@with_connection
def status(
    connection: Connection,
    run_id: Annotated[
        str | None,
        typer.Argument(help="The run's id (default: the latest run).", show_default=False),
    ] = None,
    watch_: WatchOption = False,
    interval: IntervalOption = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Show a run's state and its rounds: accuracy, clients, bytes up and down.

    With --watch, follows it and exits 0 only if it finishes.
    """
    with reported_errors(as_json=as_json), operations(connection) as ops:
        if run_id is None:
            runs = ops.runs()
            if not runs:
                raise NotFoundError("no federated run yet: start one with fedge rounds start")
            run_id = runs[0].run_id
        if watch_:
            _watch_and_exit(ops, connection, run_id, interval=interval, as_json=as_json)
            return
        view = ops.run(run_id)
    if as_json:
        print_json(to_json(view))
    else:
        console.print(run_view(view, now=time.time()))


@app.command("list")
@with_connection
def list_runs(connection: Connection, as_json: JsonOption = False) -> None:
    """List federated runs, newest first."""
    show_rows(
        connection,
        lambda ops: ops.runs(),
        lambda rows: runs_table(rows, now=time.time()),
        as_json=as_json,
    )


@app.command("stop")
@with_connection
def stop(
    connection: Connection,
    run_id: Annotated[str, typer.Argument(help="The run's id.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Stop a running run: the round going on fails and the run ends interrupted."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        view = ops.stop_run(run_id, actor=CLI_ACTOR)
    _report(view, as_json=as_json)
