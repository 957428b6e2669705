"""The lineage of a model a federated run produced.

:func:`lineage_for_run` turns a finished run into the
:class:`compress.lineage.Lineage` record its packaged model carries: the rounds that
completed, the strategy and update codec, how many devices took part (the most
updates aggregated in one round), the run id and data window when the caller knows
them (the service does; ``fedge train`` has no run id), the parent model, what
started the run and the code version
(:func:`coordinator.delivery.lineage.code_version`). ``fedge train --package``, the
simulator's packaging and the retraining policy call it. Pure: no I/O besides the
cached code version.
"""

from __future__ import annotations

from collections.abc import Sequence

from compress.lineage import DataWindow, Lineage, ParentRef, Trigger
from coordinator.delivery.lineage import code_version
from coordinator.federated.reports import RunResult

__all__ = ["lineage_for_run", "run_lineage"]


def lineage_for_run(
    result: RunResult,
    *,
    trigger: Trigger,
    parent: ParentRef | None,
    strategy: str,
    codec: str,
    run_id: str | None = None,
    window: DataWindow | None = None,
) -> Lineage:
    """The lineage record of the model ``result`` holds.

    Raises:
        LineageError: a value the record refuses (a strategy or codec name with
            spaces, say).
    """
    return run_lineage(
        [r.clients for r in result.rounds if r.status == "ok"],
        trigger=trigger, parent=parent, strategy=strategy, codec=codec,
        run_id=run_id, window=window,
    )  # fmt: skip


def run_lineage(
    completed_clients: Sequence[int],
    *,
    trigger: Trigger,
    parent: ParentRef | None,
    strategy: str,
    codec: str,
    run_id: str | None = None,
    window: DataWindow | None = None,
) -> Lineage:
    """The lineage record of a run whose completed rounds aggregated
    ``completed_clients`` updates each (one entry per completed round; the service
    reads them from its store, :func:`lineage_for_run` from a :class:`RunResult`).

    Raises:
        LineageError: a value the record refuses.
    """
    return Lineage(
        trigger=trigger,
        code=code_version(),
        run_id=run_id,
        rounds=len(completed_clients),
        strategy=strategy,
        codec=codec,
        participants=max(completed_clients, default=0),
        window=window,
        parent=parent,
    )
