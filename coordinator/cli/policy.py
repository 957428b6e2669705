"""``fedge policy``: the retraining policy an operator sets once per model.

* ``set NAME --drift-psi 0.25 --windows 3 [--severity major] [--accuracy-drop 5]
  [--cooldown 3600] [--max-runs-per-day 2] [--approve] [--rounds 5] [--clients 10]
  [--min-clients 2] [--strategy fedavg] [--codec fp32] [--round-timeout 60]
  [--features N --classes K] [--run-arg key=value ...]``: set (or replace) the
  policy of model NAME. When the fleet's drift on NAME's serving version stays at
  or above the threshold for ``--windows`` consecutive fleet scores (or labelled
  feedback accuracy drops ``--accuracy-drop`` points), the service starts a
  federated run with the given settings (``--run-arg`` pairs go into the run's
  ``config`` as for ``fedge rounds start``: numbers and true/false are read as
  such). The service refuses a policy when it holds no key to sign retrained
  models (its ``[fleet]`` keys) or when the run would be refused.
* ``show NAME``, ``list``: the stored policies.
* ``delete NAME``: remove a policy (the runs it started go on).
* ``runs [--policy NAME]``: the runs policies started, with what triggered each
  and how far each went (``training``, ``trained``, ``failed``, ``rejected``,
  ``awaiting_approval``, ``rolling_out``).
* ``approve RUN``: roll out the retrained model of a run that waits for approval
  (a policy set with ``--approve``); ``fedge rollout status`` follows it.

Every command runs over ``--api`` or in-process (:mod:`coordinator.cli.operate`);
``set``, ``delete`` and ``approve`` are audited (``policy.set``, ``policy.delete``,
``retraining.approve``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from coordinator.cli.operate import operations, show_rows
from coordinator.cli.options import Connection, JsonOption, with_connection
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.cli.service_views import to_json
from coordinator.cli.training_options import key_values
from coordinator.cli.views import plural, safe_text
from coordinator.monitoring.policy import Policy, RunSettings
from coordinator.service.operations import CLI_ACTOR
from coordinator.service.store import PolicyRow, RetrainingRow

__all__ = ["app", "policies_table", "retrainings_table"]

app = typer.Typer(help="Retraining policies: when drift starts a federated run.",
                  no_args_is_help=True)  # fmt: skip

_DEFAULT = Policy("defaults", drift_psi=0.25)
_RUN = RunSettings()
NameArgument = Annotated[str, typer.Argument(help="The model's name.", show_default=False)]


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _trigger_text(policy: Policy) -> str:
    parts = []
    if policy.drift_psi is not None:
        parts.append(f"PSI >= {policy.drift_psi:g}")
    if policy.drift_severity is not None:
        parts.append(f"severity >= {policy.drift_severity}")
    drift = " or ".join(parts)
    if drift:
        drift = f"{drift} for {plural(policy.windows, 'score')}"
    if policy.accuracy_drop is not None:
        drift = " or ".join(p for p in (drift, f"accuracy -{policy.accuracy_drop:g} pt") if p)
    return drift


def policies_table(rows: Sequence[PolicyRow]) -> Table:
    """One row per policy."""
    table = Table(title=Text(f"retraining policies: {len(rows)}"))
    for name in ("model", "trigger", "cooldown", "runs/day", "approval", "run", "set by", "at"):
        table.add_column(name)
    for row in rows:
        policy, run = row.policy, row.policy.run
        table.add_row(
            Text(safe_text(policy.name)),
            Text(_trigger_text(policy)),
            Text(f"{policy.cooldown_s:g} s"),
            Text(str(policy.max_runs_per_day)),
            Text("required" if policy.require_approval else "-"),
            Text(safe_text(f"{run.rounds} x {run.strategy}, {run.clients} clients, {run.codec}")),
            Text(safe_text(row.updated_by)),
            Text(_when(row.updated_at)),
        )
    return table


def retrainings_table(rows: Sequence[RetrainingRow]) -> Table:
    """One row per run a policy started."""
    table = Table(title=Text(f"retraining runs: {len(rows)}"))
    for name in ("run", "policy", "state", "trigger", "started", "updated"):
        table.add_column(name)
    for row in rows:
        trigger = row.trigger
        what = (
            f"drift {trigger.get('value', 0.0):.3f} ({trigger.get('severity')}, "
            f"{trigger.get('signal')})"
            if trigger.get("kind") == "drift"
            else f"accuracy -{trigger.get('drop_points', 0.0):.1f} pt"
        )
        table.add_row(
            Text(safe_text(row.run_id)),
            Text(safe_text(row.policy)),
            Text(safe_text(row.state)),
            Text(safe_text(what)),
            Text(_when(row.created_at)),
            Text(_when(row.updated_at)),
        )
    return table


def _print_row(row: PolicyRow, *, as_json: bool, verb: str) -> None:
    if as_json:
        print_json(to_json(row))
    else:
        console.print(f"policy {safe_text(row.policy.name)} {verb}")
        console.print(policies_table([row]))


@app.command("set")
@with_connection
def set_policy(
    connection: Connection,
    name: NameArgument,
    drift_psi: Annotated[
        float | None, typer.Option("--drift-psi", help="Fleet drift (PSI) that triggers.")
    ] = None,
    severity: Annotated[
        str | None, typer.Option("--severity", help="Or the fleet severity: moderate, major.")
    ] = None,
    windows: Annotated[
        int, typer.Option("--windows", help="Consecutive fleet scores above the threshold.")
    ] = _DEFAULT.windows,
    accuracy_drop: Annotated[
        float | None, typer.Option("--accuracy-drop", help="Feedback accuracy drop, points.")
    ] = None,
    cooldown: Annotated[
        float, typer.Option("--cooldown", help="Seconds after a run before the next.")
    ] = _DEFAULT.cooldown_s,
    max_runs_per_day: Annotated[
        int, typer.Option("--max-runs-per-day", help="Runs in any 24 hours.")
    ] = _DEFAULT.max_runs_per_day,
    approve: Annotated[
        bool, typer.Option("--approve", help="Require an approval before the rollout.")
    ] = False,
    soak: Annotated[
        float, typer.Option("--soak", help="Seconds each rollout stage must run healthy.")
    ] = _DEFAULT.soak_s,
    holdout: Annotated[
        str | None,
        typer.Option("--holdout", help="Held-out .npz (x, y) on the coordinator to compare on."),
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds of the run.")] = _RUN.rounds,
    clients: Annotated[int, typer.Option("--clients", help="Devices per round.")] = _RUN.clients,
    min_clients: Annotated[
        int, typer.Option("--min-clients", help="Fewest updates for a round to count.")
    ] = _RUN.min_clients,
    strategy: Annotated[str, typer.Option("--strategy", help="Strategy.")] = _RUN.strategy,
    codec: Annotated[str, typer.Option("--codec", help="Update codec.")] = _RUN.codec,
    round_timeout: Annotated[
        float, typer.Option("--round-timeout", help="Seconds a round may take.")
    ] = _RUN.round_timeout_s,
    features: Annotated[
        int | None, typer.Option("--features", help="Input features (built-in models).")
    ] = None,
    classes: Annotated[int | None, typer.Option("--classes", help="Output classes.")] = None,
    run_args: Annotated[
        list[str] | None,
        typer.Option("--run-arg", help="key=value into the run's config (repeatable)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Set (or replace) a model's retraining policy."""
    config: dict[str, Any] = key_values(run_args or [], option="--run-arg")
    for key, value in (("features", features), ("classes", classes)):
        if value is not None:
            config[key] = value
    with reported_errors(as_json=as_json):
        policy = Policy(
            name=name, drift_psi=drift_psi, drift_severity=severity, windows=windows,
            accuracy_drop=accuracy_drop, cooldown_s=cooldown, max_runs_per_day=max_runs_per_day,
            require_approval=approve, soak_s=soak, holdout=holdout,
            run=RunSettings(rounds=rounds, clients=clients, min_clients=min_clients,
                            strategy=strategy, codec=codec, round_timeout_s=round_timeout,
                            config=config),
        )  # fmt: skip
        with operations(connection) as ops:
            row = ops.set_policy(policy, actor=CLI_ACTOR)
    _print_row(row, as_json=as_json, verb="set")


@app.command("show")
@with_connection
def show(connection: Connection, name: NameArgument, as_json: JsonOption = False) -> None:
    """Show a model's retraining policy."""
    show_rows(connection, lambda ops: [ops.policy(name)], policies_table, as_json=as_json)


@app.command("list")
@with_connection
def list_policies(connection: Connection, as_json: JsonOption = False) -> None:
    """List every retraining policy."""
    show_rows(connection, lambda ops: ops.policies(), policies_table, as_json=as_json)


@app.command("delete")
@with_connection
def delete(connection: Connection, name: NameArgument, as_json: JsonOption = False) -> None:
    """Remove a model's retraining policy (the runs it started go on)."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        row = ops.delete_policy(name, actor=CLI_ACTOR)
    _print_row(row, as_json=as_json, verb="deleted")


@app.command("approve")
@with_connection
def approve(
    connection: Connection,
    run_id: Annotated[str, typer.Argument(help="The retraining run.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """Roll out a retrained model that waits for approval."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        row = ops.approve_retraining(run_id, actor=CLI_ACTOR)
    if as_json:
        print_json(to_json(row))
    else:
        console.print(retrainings_table([row]))


@app.command("runs")
@with_connection
def runs(
    connection: Connection,
    policy: Annotated[
        str | None, typer.Option("--policy", help="Only this policy's.", show_default=False)
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List the runs retraining policies started and what triggered each."""
    show_rows(connection, lambda ops: ops.retrainings(policy=policy), retrainings_table,
              as_json=as_json)  # fmt: skip
