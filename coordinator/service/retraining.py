"""Retraining on drift, in the service: the operator's policies and the loop that acts on them.

Workflow:

1. The operator sets a policy per model (``fedge policy set NAME --drift-psi 0.25
   --windows 3 ...``, ``PUT /v1/policies/NAME``): :meth:`Retraining.set_policy`
   checks that the run it describes is one the service can start (the same checks
   as ``fedge rounds start``), and that the service holds a key to sign the
   retrained models with: the ``[fleet]`` statement keys, whose public halves the
   devices trust. Without one the policy is refused (:class:`PolicyError`): a
   policy whose runs could never be rolled out would only retrain in vain. Setting
   and deleting are audited (``policy.set``, ``policy.delete``).
2. Every ``every_s`` seconds :meth:`Retraining.tick` reads, for each policy, the
   fleet-wide drift scores of the model's newest scored version (the drift
   monitor stores them, :mod:`coordinator.service.drift`) and the runs the policy
   started before (their times: cooldown and daily budget hold across restarts),
   and asks :func:`~coordinator.monitoring.policy.decide`.
3. On ``start_run`` it starts the federated run through the service's
   :class:`~coordinator.service.runs.RunManager` (the machinery of ``fedge rounds
   start``), as actor ``policy:NAME`` (``fedge runs`` shows it as the run's
   creator), records the run with its trigger (policy, drift value, severity,
   signal, devices) in ``retraining_runs`` (state ``training``) and audits
   ``retraining.start`` with the trigger. A run that cannot start (another run
   going, no device able to train) is audited ``retraining.blocked`` once per
   reason and retried at the next tick.
4. When the run ends, the next tick records how (``trained`` or ``failed``) and
   audits it (``retraining.trained`` / ``retraining.failed``).

Steps 1-4 are what this module does. Evaluating the candidate against the serving
model on held-out data, packaging it and starting the staged rollout (or waiting
for ``fedge policy approve``) come next; ``trained`` is where a run's record stops
for now (see docs/monitoring.md, "Retraining policy").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from compress.errors import CompressError
from coordinator.errors import CoordinatorError, PolicyError, RunError
from coordinator.monitoring.policy import START_RUN, Decision, Policy, decide
from coordinator.monitoring.scores import FLEET
from coordinator.service.operations import Actor, RunRequest
from coordinator.service.runs import RunManager, run_strategy
from coordinator.service.store import PolicyRow, RetrainingRow, RunState, Store
from coordinator.service.tokens import Role

__all__ = ["FAILED", "NO_SIGNING_KEY", "TRAINED", "TRAINING", "Retraining", "run_request"]

logger = logging.getLogger(__name__)

TRAINING = "training"
"""A retraining run's state while its federated run goes on."""
TRAINED = "trained"
"""Its federated run finished (at least one round succeeded)."""
FAILED = "failed"
"""Its federated run failed or was interrupted."""

NO_SIGNING_KEY = (
    "the service holds no key to sign retrained models with: configure the [fleet] "
    "table's keys (private keys whose public halves the devices trust) and restart it"
)

Audit = Callable[[Actor, str, str, dict[str, Any]], None]


def run_request(policy: Policy) -> RunRequest:
    """The federated run a policy's trigger starts."""
    run = policy.run
    return RunRequest(
        rounds=run.rounds,
        strategy=run.strategy,
        codec=run.codec,
        min_clients=run.min_clients,
        round_timeout_s=run.round_timeout_s,
        config={"model": policy.name, **run.config, "clients_per_round": run.clients},
    )


def _actor(policy: str) -> Actor:
    return Actor(f"policy:{policy}", Role.OPERATOR)


class Retraining:
    """The operator's policies and the loop that starts runs on them (see the module docstring).

    Args:
        store: The service's store.
        runs: The service's run manager.
        audit: Writes an audit line (the service's).
        can_sign: Whether the service holds a key to sign retrained models.
        clock: Unix time source.
        every_s: Seconds between evaluations.
    """

    def __init__(
        self,
        store: Store,
        runs: RunManager,
        *,
        audit: Audit,
        can_sign: bool,
        clock: Callable[[], float] = time.time,
        every_s: float = 5.0,
    ) -> None:
        self._store = store
        self._runs = runs
        self._audit = audit
        self._can_sign = can_sign
        self._clock = clock
        self._every_s = every_s
        self._blocked: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- operator side

    def set_policy(self, policy: Policy, *, actor: Actor) -> PolicyRow:
        """Store (or replace) a model's policy, audited ``policy.set``.

        Raises:
            PolicyError: the service cannot sign retrained models, or the run the
                policy describes would be refused.
        """
        if not self._can_sign:
            logger.warning("policy %s refused: no signing key", policy.name)
            raise PolicyError(f"policy {policy.name!r} refused: {NO_SIGNING_KEY}")
        request = run_request(policy)
        try:
            self._runs.config_of(request)
            run_strategy(request)
        except (RunError, CompressError) as exc:
            logger.warning("policy %s refused: its run is invalid: %s", policy.name, exc)
            raise PolicyError(f"policy {policy.name!r}: its run is invalid: {exc}") from exc
        row = self._store.set_policy(policy, updated_by=actor.name, at=self._clock())
        self._audit(actor, "policy.set", policy.name, policy.to_dict())
        logger.info("retraining policy for %s set by %s", policy.name, actor.name)
        return row

    def policy(self, name: str) -> PolicyRow:
        """A model's policy.

        Raises:
            NotFoundError: none.
        """
        return self._store.policy(name)

    def policies(self) -> list[PolicyRow]:
        """Every policy, by name."""
        return self._store.policies()

    def delete_policy(self, name: str, *, actor: Actor) -> PolicyRow:
        """Remove a model's policy, audited ``policy.delete``; its runs go on.

        Raises:
            NotFoundError: none.
        """
        row = self._store.delete_policy(name)
        self._audit(actor, "policy.delete", name, {})
        logger.info("retraining policy for %s deleted by %s", name, actor.name)
        return row

    def retrainings(self, *, policy: str | None = None) -> list[RetrainingRow]:
        """The runs policies started, newest first."""
        return self._store.retrainings(policy=policy)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        """Evaluate the policies every ``every_s`` seconds on a thread, until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="retraining", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop (a run it started goes on until the service stops it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self.tick()
            except CoordinatorError as exc:
                logger.error("retraining: evaluation failed: %s", exc)
            except Exception:
                logger.exception("retraining: evaluation failed")

    def tick(self) -> list[RetrainingRow]:
        """One evaluation: follow the runs going on, then decide for each policy.

        Returns:
            The retraining runs started or moved on by this tick.

        Raises:
            StoreError: the store failed.
        """
        changed = self._follow_runs()
        for row in self._store.policies():
            started = self._evaluate(row.policy)
            if started is not None:
                changed.append(started)
        return changed

    def decision(self, policy: Policy) -> Decision:
        """What the policy decides now, from the stored scores and runs."""
        history = self._history(policy.name)
        runs = [r.created_at for r in self._store.retrainings(policy=policy.name)]
        return decide(policy, history, self._clock(), runs_started=runs)

    def _history(self, model: str) -> list[Any]:
        fleets = [s for s in self._store.drift_scores(model=model) if s.scope == FLEET]
        if not fleets:
            return []
        version = max(s.version for s in fleets)
        return self._store.drift_history(model=model, version=version, limit=1000)

    def _evaluate(self, policy: Policy) -> RetrainingRow | None:
        decision = self.decision(policy)
        if decision.action != START_RUN:
            self._blocked.pop(policy.name, None)
            return None
        actor = _actor(policy.name)
        try:
            run = self._runs.start(run_request(policy), actor=actor.name)
        except (CoordinatorError, CompressError) as exc:
            reason = str(exc)
            if self._blocked.get(policy.name) != reason:
                self._blocked[policy.name] = reason
                logger.warning("retraining for %s cannot start: %s", policy.name, reason)
                self._audit(
                    actor, "retraining.blocked", policy.name,
                    {"reason": reason, "trigger": decision.trigger},
                )  # fmt: skip
            return None
        self._blocked.pop(policy.name, None)
        row = self._store.add_retraining(
            run.run_id, policy=policy.name, state=TRAINING, trigger=decision.trigger,
            at=run.created_at,
        )  # fmt: skip
        logger.warning("retraining run %s started for %s: %s", run.run_id, policy.name,
                       decision.reason)  # fmt: skip
        self._audit(
            actor, "retraining.start", run.run_id,
            {"reason": decision.reason, "trigger": decision.trigger},
        )  # fmt: skip
        return row

    def _follow_runs(self) -> list[RetrainingRow]:
        moved = []
        for row in self._store.retrainings():
            if row.state != TRAINING:
                continue
            run = self._store.run(row.run_id)
            if run is None or run.state == RunState.RUNNING:
                continue
            state = TRAINED if run.state == RunState.FINISHED else FAILED
            updated = self._store.update_retraining(
                row.run_id, state=state, detail={"run_state": run.state.value}, at=self._clock()
            )
            self._audit(_actor(row.policy), f"retraining.{state}", row.run_id,
                        {"run_state": run.state.value})  # fmt: skip
            logger.info("retraining run %s: %s", row.run_id, state)
            moved.append(updated)
        return moved
