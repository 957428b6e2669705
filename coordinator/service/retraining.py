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
4. When the run ends, the run machinery hands its final weights over
   (:meth:`RunManager.on_finish`); the next tick records how it ended (``failed``,
   audited ``retraining.failed``) or, for a finished run, delivers it:
5. With the policy's ``holdout`` data, the candidate is compared with the serving
   model (the stored artifact of the version that drifted) and packaged, signed
   with the ``[fleet]`` keys, only if strictly better
   (:func:`~coordinator.service.candidate.package_candidate`); its manifest's
   metadata names the run, the policy and the trigger (``retrained_by``,
   ``run_id``, ``trigger`` as JSON). A candidate that is not better is
   ``rejected`` (audited ``retraining.rejected`` with both figures). Without
   holdout data, or when the weights were lost (a restart), the record stays
   ``trained`` with the reason.
6. The artifact is uploaded into the service's store (verified against the
   trusted keys like any upload, audited ``artifact.upload`` by ``policy:NAME``),
   then either ``awaiting_approval`` (``require_approval``: ``fedge policy approve
   RUN``, audited ``retraining.approve``) or at once ``rolling_out``: a staged
   rollout with the service's default health gate to the devices serving the
   model (``rollout.create`` by ``policy:NAME``; ``fedge rollout status`` follows
   it).

See docs/monitoring.md, "Retraining policy".
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.keys import SigningKey
from compress.lineage import DataWindow, Lineage, ParentRef, Trigger
from compress.signing import TrustedKeys
from coordinator.delivery.packaging import load_labelled_npz
from coordinator.errors import (
    CoordinatorError,
    NotFoundError,
    PackagingError,
    PolicyError,
    RunError,
    WorseThanBaselineError,
)
from coordinator.federated.lineage import run_lineage
from coordinator.federated.models import Weights
from coordinator.federated.runs import RunConfig, RunResult
from coordinator.monitoring.policy import (
    DEFAULT_SOAK_S,
    START_RUN,
    Decision,
    Policy,
    decide,
    trigger_reason,
)
from coordinator.monitoring.scores import FLEET
from coordinator.service.candidate import package_candidate
from coordinator.service.operations import Actor, RolloutRequest, RolloutView, RunRequest
from coordinator.service.runs import RunManager, run_strategy
from coordinator.service.store import ArtifactRow, PolicyRow, RetrainingRow, RunState, Store
from coordinator.service.tokens import Role

__all__ = [
    "AWAITING_APPROVAL",
    "FAILED",
    "NO_SIGNING_KEY",
    "REJECTED",
    "ROLLING_OUT",
    "TRAINED",
    "TRAINING",
    "Retraining",
    "run_request",
]

logger = logging.getLogger(__name__)

TRAINING = "training"
"""A retraining run's state while its federated run goes on."""
TRAINED = "trained"
"""Its federated run finished, and its candidate was not evaluated (see ``detail``)."""
FAILED = "failed"
"""Its federated run failed or was interrupted, or its candidate could not be packaged."""
REJECTED = "rejected"
"""Its candidate was not better than the serving model: nothing was signed."""
AWAITING_APPROVAL = "awaiting_approval"
"""Packaged and uploaded; waits for ``fedge policy approve RUN``."""
ROLLING_OUT = "rolling_out"
"""A staged rollout of its artifact started (``detail.rollout_id``)."""

NO_SIGNING_KEY = (
    "the service holds no key to sign retrained models with: configure the [fleet] "
    "table's keys (private keys whose public halves the devices trust) and restart it"
)

Audit = Callable[[Actor, str, str, dict[str, Any]], None]
Upload = Callable[[bytes, Actor], ArtifactRow]
StartRollout = Callable[[RolloutRequest, Actor], RolloutView]


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
        keys: The keys that sign retrained models (the ``[fleet]`` keys); none:
            every policy is refused.
        trusted: The service's trusted keys (the serving artifact is checked).
        upload: Stores an artifact as ``fedge artifacts upload`` does.
        start_rollout: Starts a staged rollout as ``fedge rollout create`` does.
        clock: Unix time source.
        every_s: Seconds between evaluations.
    """

    def __init__(
        self,
        store: Store,
        runs: RunManager,
        *,
        audit: Audit,
        keys: Sequence[SigningKey],
        trusted: TrustedKeys | None,
        upload: Upload,
        start_rollout: StartRollout,
        clock: Callable[[], float] = time.time,
        every_s: float = 5.0,
    ) -> None:
        self._store = store
        self._runs = runs
        self._audit = audit
        self._keys = tuple(keys)
        self._trusted = trusted
        self._upload = upload
        self._start_rollout = start_rollout
        self._candidates: dict[str, tuple[str, Weights]] = {}
        self._candidates_lock = threading.Lock()
        self._steps = threading.Lock()  # one tick or approval at a time moves records
        runs.on_finish(self.run_finished)
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
        if not self._keys:
            logger.warning("policy %s refused: no signing key", policy.name)
            raise PolicyError(f"policy {policy.name!r} refused: {NO_SIGNING_KEY}")
        request = run_request(policy)
        try:
            self._runs.config_of(request)
            run_strategy(request)
            if policy.holdout is not None:
                load_labelled_npz(Path(policy.holdout))
        except (RunError, CompressError, PackagingError) as exc:
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
        with self._steps:
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

    def run_finished(
        self, run_id: str, state: RunState, result: RunResult | None, config: RunConfig
    ) -> None:
        """Keep a finished run's final weights for the next tick (the listener
        :meth:`RunManager.on_finish` calls, on the run's thread)."""
        if state == RunState.FINISHED and result is not None:
            with self._candidates_lock:
                self._candidates[run_id] = (config.family, dict(result.weights))

    def _follow_runs(self) -> list[RetrainingRow]:
        moved = []
        for row in self._store.retrainings():
            if row.state != TRAINING:
                continue
            run = self._store.run(row.run_id)
            if run is None or run.state == RunState.RUNNING:
                continue
            if run.state == RunState.FINISHED:
                moved.append(self._deliver(row))
                continue
            moved.append(self._move(row, FAILED, {"run_state": run.state.value}))
        return moved

    def _move(self, row: RetrainingRow, state: str, detail: dict[str, Any]) -> RetrainingRow:
        updated = self._store.update_retraining(
            row.run_id, state=state, detail=detail, at=self._clock()
        )
        self._audit(_actor(row.policy), f"retraining.{state}", row.run_id, detail)
        logger.info("retraining run %s: %s %s", row.run_id, state, detail)
        return updated

    def _deliver(self, row: RetrainingRow) -> RetrainingRow:
        """Evaluate, package and upload a finished run's candidate; roll it out or wait."""
        with self._candidates_lock:
            candidate = self._candidates.pop(row.run_id, None)
        policy, why = self._deliverable(row, candidate is not None)
        if policy is None or candidate is None:
            return self._move(row, TRAINED, {"run_state": "finished", "next": why})
        family, weights = candidate
        try:
            artifact = self._package(row, policy, family, weights)
        except WorseThanBaselineError as exc:
            return self._move(row, REJECTED, {"run_state": "finished", "reason": str(exc)})
        except (CoordinatorError, CompressError, OSError) as exc:
            logger.error("retraining run %s: cannot package its candidate: %s", row.run_id, exc)
            return self._move(row, FAILED, {"run_state": "finished", "reason": str(exc)})
        detail = {"run_state": "finished", "artifact": artifact.sha256,
                  "version": artifact.version}  # fmt: skip
        if policy.require_approval:
            return self._move(row, AWAITING_APPROVAL, detail)
        return self._roll_out(row, detail, _actor(row.policy))

    def _deliverable(self, row: RetrainingRow, has_weights: bool) -> tuple[Policy | None, str]:
        """The policy to deliver the run's candidate under, or None and why not."""
        try:
            policy = self._store.policy(row.policy).policy
        except NotFoundError:
            return None, "policy deleted"
        if not has_weights:
            return None, "final weights lost (the service restarted)"
        if policy.holdout is None:
            return None, "no holdout data in the policy: not evaluated"
        return policy, ""

    def _package(
        self, row: RetrainingRow, policy: Policy, family: str, weights: Weights
    ) -> ArtifactRow:
        holdout = load_labelled_npz(Path(str(policy.holdout)))
        version = int(row.trigger.get("version", 0))
        serving = [a for a in self._store.artifacts() if a.name == policy.name]
        current = [a for a in serving if a.version == version]
        if not current:
            raise PackagingError(f"no stored artifact of {policy.name} v{version} to compare with")
        metadata = {
            "retrained_by": f"policy:{policy.name}",
            "run_id": row.run_id,
            "trigger": json.dumps(row.trigger, sort_keys=True, separators=(",", ":")),
        }
        new_version = max(a.version for a in serving) + 1
        lineage = self._lineage(row, policy, current[0])
        with tempfile.TemporaryDirectory(prefix="fedge-retrain-") as tmp:
            baseline, result = package_candidate(
                family=family, weights=weights, name=policy.name, version=new_version,
                keys=self._keys, holdout=holdout,
                serving=self._store.artifact_bytes(current[0].sha256), trusted=self._trusted,
                out=Path(tmp) / f"{policy.name}-v{new_version}.fedge",
                now=datetime.fromtimestamp(self._clock(), UTC), metadata=metadata,
                lineage=lineage,
            )  # fmt: skip
            data = result.path.read_bytes()
        self._store.update_retraining(
            row.run_id, state=TRAINING, at=self._clock(),
            detail={"serving_metric": baseline.value, "candidate_metric": result.packaged_metric,
                    "metric": baseline.metric},
        )  # fmt: skip
        return self._upload(data, _actor(policy.name))

    def _lineage(self, row: RetrainingRow, policy: Policy, serving: ArtifactRow) -> Lineage:
        """The lineage of the run's candidate: the policy and drift that started it, the
        run's completed rounds and most participants, its time span as the data window,
        and the serving model it was compared with as its parent."""
        trigger = row.trigger
        drift = trigger.get("value") if trigger.get("kind") == "drift" else None
        rounds = self._store.rounds(row.run_id)
        return run_lineage(
            [int(r.metrics.get("clients", 0)) for r in rounds if r.status == "ok"],
            trigger=Trigger.by_policy(
                policy.name,
                drift=float(drift) if drift is not None else None,
                reason=trigger_reason(trigger),
            ),
            parent=ParentRef(serving.name, serving.version, str(serving.manifest["sha256"])),
            strategy=policy.run.strategy,
            codec=policy.run.codec,
            run_id=row.run_id,
            window=DataWindow(start=int(row.created_at), end=int(self._clock())),
        )

    def _roll_out(self, row: RetrainingRow, detail: dict[str, Any], actor: Actor) -> RetrainingRow:
        model = row.policy
        try:
            soak = self._store.policy(model).policy.soak_s
        except NotFoundError:  # deleted since it was approved
            soak = DEFAULT_SOAK_S
        devices = sorted(d.device_id for d in self._store.devices() if d.model == model)
        if not devices:
            return self._move(row, AWAITING_APPROVAL, {**detail, "next": "no device serves it"})
        target = "device:" + ",".join(devices)
        request = RolloutRequest(str(detail["artifact"]), target=target, soak=f"{soak:g}s")
        try:
            view = self._start_rollout(request, actor)
        except CoordinatorError as exc:
            logger.error("retraining run %s: rollout refused: %s", row.run_id, exc)
            return self._move(row, AWAITING_APPROVAL, {**detail, "next": f"rollout: {exc}"})
        return self._move(row, ROLLING_OUT, {**detail, "rollout_id": view.rollout.rollout_id})

    def approve(self, run_id: str, *, actor: Actor) -> RetrainingRow:
        """Start the rollout of a packaged candidate waiting for approval.

        Raises:
            NotFoundError: no such retraining run.
            PolicyError: it is not waiting for approval.
        """
        with self._steps:
            row = self._store.retraining(run_id)
            if row.state != AWAITING_APPROVAL:
                logger.warning("approval of %s refused: it is %s", run_id, row.state)
                raise PolicyError(f"retraining run {run_id} is {row.state}, not awaiting approval")
            self._audit(actor, "retraining.approve", run_id,
                        {"artifact": row.detail.get("artifact")})  # fmt: skip
            return self._roll_out(row, dict(row.detail), actor)
