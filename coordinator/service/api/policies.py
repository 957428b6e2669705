"""Retraining policies over HTTP: their schemas and routes.

* ``GET /v1/policies`` (viewer): every policy, by model name.
* ``GET /v1/policies/{name}`` (viewer): one model's policy; 404 when none.
* ``POST /v1/policies/{name}`` (operator): set or replace it (audited
  ``policy.set``); 400 ``policy_error`` when the policy is invalid, its run would
  be refused, or the service holds no key to sign retrained models.
* ``POST /v1/policies/{name}/delete`` (operator): remove it (audited
  ``policy.delete``); answers the removed policy.
* ``GET /v1/retrainings?policy=NAME`` (viewer): the runs policies started, with
  their triggers and how far each went.
* ``POST /v1/retrainings/{run_id}/approve`` (operator): roll out a retrained model
  that waits for approval (audited ``retraining.approve``); 400 ``policy_error``
  when the run is not waiting for one.

The bodies are :class:`PolicyBody` (the policy without its name, taken from the
path); what the values mean is checked by
:class:`~coordinator.monitoring.policy.Policy` itself. Like
:mod:`coordinator.service.api.routes`, this module does not use ``from __future__
import annotations`` (FastAPI reads the endpoints' annotations at runtime).
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, params
from pydantic import BaseModel, ConfigDict, Field

from coordinator.monitoring.policy import Policy, RunSettings
from coordinator.service.api.auth import RoleDependency
from coordinator.service.operations import Actor, Operations

__all__ = [
    "PolicyBody",
    "PolicyOut",
    "PolicyRowOut",
    "RetrainingOut",
    "RunSettingsBody",
    "RunSettingsOut",
    "add_policy_routes",
]

_NAME = Path(min_length=1, max_length=128)
_RUN = RunSettings()
_POLICY = Policy("defaults", drift_psi=0.25)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSettingsOut(_Out):
    """The federated run a policy starts."""

    rounds: int
    clients: int = Field(description="Devices asked per round.")
    min_clients: int
    strategy: str
    codec: str
    round_timeout_s: float
    config: dict[str, Any] = Field(description="Further run settings, as for `POST /v1/runs`.")


class PolicyOut(_Out):
    """A model's retraining policy."""

    name: str = Field(description="The model's name.")
    drift_psi: float | None = Field(description="Fleet drift (PSI) that triggers.")
    drift_severity: str | None = Field(description="Or the fleet severity that triggers.")
    windows: int = Field(description="Consecutive fleet scores that must all be above.")
    accuracy_drop: float | None = Field(description="Feedback accuracy drop (points).")
    cooldown_s: float
    max_runs_per_day: int
    require_approval: bool
    soak_s: float = Field(description="Soak of each stage of the retrained model's rollout.")
    holdout: str | None = Field(description="Held-out data the candidate is compared on.")
    run: RunSettingsOut


class PolicyRowOut(_Out):
    """A stored policy, who set it and when."""

    policy: PolicyOut
    updated_by: str
    updated_at: float


class RetrainingOut(_Out):
    """A run a policy started."""

    run_id: str
    policy: str
    state: str = Field(
        description="`training`, `trained`, `failed`, `rejected`, `awaiting_approval`, "
        "`rolling_out` (see coordinator.service.retraining)."
    )
    trigger: dict[str, Any] = Field(description="What fired: policy, drift value, severity...")
    detail: dict[str, Any]
    created_at: float
    updated_at: float


class RunSettingsBody(_In):
    """The run a policy starts (defaults as ``fedge policy set``)."""

    rounds: int = _RUN.rounds
    clients: int = _RUN.clients
    min_clients: int = _RUN.min_clients
    strategy: str = Field(default=_RUN.strategy, min_length=1, max_length=256)
    codec: str = Field(default=_RUN.codec, min_length=1, max_length=256)
    round_timeout_s: float = _RUN.round_timeout_s
    config: dict[str, Any] = Field(default_factory=dict)


class PolicyBody(_In):
    """``POST /v1/policies/{name}``: the policy, its name in the path."""

    drift_psi: float | None = None
    drift_severity: str | None = None
    windows: int = _POLICY.windows
    accuracy_drop: float | None = None
    cooldown_s: float = _POLICY.cooldown_s
    max_runs_per_day: int = _POLICY.max_runs_per_day
    require_approval: bool = False
    soak_s: float = _POLICY.soak_s
    holdout: str | None = Field(default=None, min_length=1, max_length=4096)
    run: RunSettingsBody = Field(default_factory=RunSettingsBody)

    def to_policy(self, name: str) -> Policy:
        """The policy this body sets.

        Raises:
            PolicyError: the values make no valid policy.
        """
        fields = self.model_dump()
        run = RunSettings(**fields.pop("run"))
        return Policy(name=name, run=run, **fields)


def add_policy_routes(
    router: APIRouter, ops: Operations, viewer: params.Depends, operator: RoleDependency
) -> None:
    """Add the routes of the module docstring to ``router``."""
    responses: dict[int | str, dict[str, Any]] = {404: {"description": "No such policy."}}

    @router.get("/v1/policies", tags=["policies"], dependencies=[viewer])
    def list_policies() -> list[PolicyRowOut]:
        """Every retraining policy, by model name."""
        return [PolicyRowOut.model_validate(row) for row in ops.policies()]

    @router.get("/v1/policies/{name}", tags=["policies"], dependencies=[viewer],
                responses=responses)  # fmt: skip
    def get_policy(name: Annotated[str, _NAME]) -> PolicyRowOut:
        """One model's retraining policy."""
        return PolicyRowOut.model_validate(ops.policy(name))

    @router.post("/v1/policies/{name}", tags=["policies"])
    def set_policy(
        name: Annotated[str, _NAME], body: PolicyBody, actor: Annotated[Actor, Depends(operator)]
    ) -> PolicyRowOut:
        """Set or replace a model's retraining policy."""
        return PolicyRowOut.model_validate(ops.set_policy(body.to_policy(name), actor=actor))

    @router.post("/v1/policies/{name}/delete", tags=["policies"], responses=responses)
    def delete_policy(
        name: Annotated[str, _NAME], actor: Annotated[Actor, Depends(operator)]
    ) -> PolicyRowOut:
        """Remove a model's retraining policy (the runs it started go on)."""
        return PolicyRowOut.model_validate(ops.delete_policy(name, actor=actor))

    @router.get("/v1/retrainings", tags=["policies"], dependencies=[viewer])
    def list_retrainings(
        policy: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    ) -> list[RetrainingOut]:
        """The runs retraining policies started, newest first."""
        return [RetrainingOut.model_validate(row) for row in ops.retrainings(policy=policy)]

    @router.post("/v1/retrainings/{run_id}/approve", tags=["policies"], responses=responses)
    def approve_retraining(
        run_id: Annotated[str, Path(min_length=1, max_length=256)],
        actor: Annotated[Actor, Depends(operator)],
    ) -> RetrainingOut:
        """Roll out a retrained model that waits for approval."""
        return RetrainingOut.model_validate(ops.approve_retraining(run_id, actor=actor))
