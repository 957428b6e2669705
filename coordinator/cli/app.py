"""The ``fedge`` operator CLI (Typer + Rich).

Entry point :func:`main` configures logging (``-v`` for info, ``-vv`` for debug, to
stderr) and dispatches to the command groups:

* ``fedge keys``  -- :mod:`coordinator.cli.keys`
* ``fedge model`` -- :mod:`coordinator.cli.model`
* ``fedge deploy | rollback`` -- :mod:`coordinator.cli.deploy`
* ``fedge broker`` -- :mod:`coordinator.cli.broker`
* ``fedge ca`` -- :mod:`coordinator.cli.ca` (the mutual-TLS certificate authority)
* ``fedge train`` -- :mod:`coordinator.cli.train`
* ``fedge data`` -- :mod:`coordinator.cli.data`
* ``fedge simulate`` -- :mod:`coordinator.cli.simulate`
* ``fedge devices | telemetry | presence | audit`` -- :mod:`coordinator.cli.observe`
* ``fedge fleet publish | show`` -- :mod:`coordinator.cli.fleet` (the signed fleet
  statement; ``fedge fleet`` without a subcommand is ``fedge devices``, its former name)
* ``fedge drift`` -- :mod:`coordinator.cli.drift` (input drift per fleet and device)
* ``fedge policy`` -- :mod:`coordinator.cli.policy` (retraining policies on drift)
* ``fedge artifacts`` -- :mod:`coordinator.cli.artifacts`
* ``fedge rollout`` -- :mod:`coordinator.cli.rollout`
* ``fedge rounds`` -- :mod:`coordinator.cli.rounds`
* ``fedge coordinator`` -- :mod:`coordinator.cli.service` (the long-running service)
* ``fedge device enroll | revoke | list`` -- :mod:`coordinator.cli.device` (enrollment,
  through the service's API only)

``devices``, ``telemetry``, ``presence``, ``audit``, ``drift``, ``artifacts``, ``deploy``,
``rollback``, ``rollout`` and ``rounds`` operate a fleet through a coordinator: its
HTTP API (``--api``) or a service started in-process (``--broker``); see
:mod:`coordinator.cli.operate`. ``deploy`` sends an artifact to every targeted device
at once, ``rollout`` in stages behind health gates. ``train`` talks to the broker
directly (``--broker`` only): federated rounds with this process's files (starting
weights, evaluation data, the packaged result); a service does the same job with
``rounds start``, over the same round code underneath. Every connection option is
declared once, in :mod:`coordinator.cli.options`.

The current directory comes first on ``sys.path`` (as with ``python -m``), so that
``fedge train --model mymodels:cnn`` or ``fedge simulate --model ...`` import
``mymodels.py`` from where the command runs (:func:`use_current_directory`).

Commands are thin front ends over library code in ``compress``, ``edge_agent`` and
``coordinator``; errors from the three packages become one line and exit status 1.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from coordinator import __version__
from coordinator.cli import (
    artifacts,
    broker,
    ca,
    data,
    deploy,
    device,
    drift,
    fleet,
    keys,
    model,
    observe,
    policy,
    rollout,
    rounds,
    service,
    simulate,
    train,
)

app = typer.Typer(
    name="fedge",
    help="fedge: federated learning and signed, quantized model delivery to edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(keys.app, name="keys")
app.add_typer(model.app, name="model")
app.add_typer(broker.app, name="broker")
app.add_typer(ca.app, name="ca")
app.add_typer(data.app, name="data")
app.add_typer(service.app, name="coordinator")
app.command("deploy")(deploy.deploy)
app.command("rollback")(deploy.rollback)
app.command("train")(train.train)
app.command("simulate")(simulate.simulate)
app.command("devices")(observe.devices)
app.add_typer(fleet.app, name="fleet")  # without a subcommand: devices, its former name
app.command("telemetry")(observe.telemetry)
app.command("presence")(observe.presence)
app.command("audit")(observe.audit)
app.command("drift")(drift.drift)
app.add_typer(policy.app, name="policy")
app.add_typer(artifacts.app, name="artifacts")
app.add_typer(rollout.app, name="rollout")
app.add_typer(rounds.app, name="rounds")
app.add_typer(device.app, name="device")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedge {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v info, -vv debug logs.")
    ] = 0,
    version: Annotated[  # noqa: ARG001 - handled eagerly by its callback
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Operator CLI: keys, model packaging, delivery to the fleet."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower logs every round (and its defaults) through its own handler: -v shows it.
    logging.getLogger("flwr").setLevel(logging.ERROR if verbose == 0 else level)


def use_current_directory() -> None:
    """Put the current directory first on ``sys.path`` (once), as ``python -m`` does."""
    here = os.getcwd()
    if not sys.path or sys.path[0] != here:
        sys.path.insert(0, here)


def main() -> None:
    """Console-script entry point."""
    use_current_directory()
    app()
