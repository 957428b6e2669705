"""The HTTP API's enrollment routes: the device registry and ``POST /v1/enroll``.

Routes (added by :func:`add_enrollment_routes` when the service has an
:class:`~coordinator.service.enrollment.EnrollmentDesk`):

==========================================  ========  =====================================
``POST /v1/enrollments``                    operator  put a device in the registry, get
                                                      its one-time token (shown once)
``GET /v1/enrollments``                     viewer    the registry
``POST /v1/enrollments/{device_id}/revoke`` operator  cut a device's broker access
``POST /v1/enroll``                         public    a device redeems its token
==========================================  ========  =====================================

``POST /v1/enroll`` takes no bearer token (the device has none yet): the enrollment
token in its body is the secret. It is rate-limited exactly like a failed bearer
authentication: an address cooling down gets 429 before its token is looked at, and
a refused token is a 401 that counts towards the address's failures, is logged and
audited (``auth.fail``). The 401 does not say which check failed.

Like :mod:`coordinator.service.api.routes`, no ``from __future__ import annotations``:
FastAPI reads the annotations at runtime.
"""

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from coordinator.errors import EnrollmentRefusedError
from coordinator.service.api.auth import Guard
from coordinator.service.enrollment import (
    MAX_TOKEN_HOURS,
    EnrollmentDesk,
    EnrollRequest,
)
from coordinator.service.operations import Actor
from coordinator.service.store.registry import Credential, DeviceState
from coordinator.service.tokens import Role

__all__ = ["ENROLL_PATH", "EnrolledOut", "add_enrollment_routes"]

logger = logging.getLogger(__name__)

ENROLL_PATH = "/v1/enroll"
"""The device's route (public: the enrollment token in the body is its secret)."""

_DEVICE_ID = Path(min_length=1, max_length=64)


class RegisteredOut(BaseModel):
    """A device in the registry."""

    model_config = ConfigDict(from_attributes=True)

    device_id: str
    state: DeviceState
    credential: Credential | None
    created_by: str
    created_at: float
    accepted_at: float | None
    revoked_at: float | None
    updated_at: float


class EnrollmentCreate(BaseModel):
    """``POST /v1/enrollments``: which device, and how long its token is valid."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(min_length=1, max_length=64)
    expires_in_s: float | None = Field(default=None, gt=0, le=MAX_TOKEN_HOURS * 3600)


class EnrollmentOut(BaseModel):
    """The one-time token of a device just enrolled (shown once)."""

    device: RegisteredOut
    token: str
    expires_at: float


class EnrollBody(BaseModel):
    """``POST /v1/enroll``: what the device sends (a password, or a CSR for mutual TLS)."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=128)
    device_id: str = Field(min_length=1, max_length=64)
    password: str | None = Field(default=None, min_length=16, max_length=256)
    csr: str | None = Field(default=None, min_length=1, max_length=16384)


class EnrolledOut(BaseModel):
    """What an enrolled device receives (``keyset`` is base64)."""

    device_id: str
    broker_url: str
    broker_ca: str | None
    keyset: str
    fleet: str | None
    certificate: str | None


def add_enrollment_routes(router: APIRouter, desk: EnrollmentDesk, guard: Guard) -> None:
    """Add the registry and enrollment routes (see the module docstring)."""
    viewer = Depends(guard.require(Role.VIEWER))
    operator = guard.require(Role.OPERATOR)

    @router.post("/v1/enrollments", tags=["enrollment"], status_code=status.HTTP_201_CREATED)
    def create_enrollment(
        body: EnrollmentCreate, actor: Annotated[Actor, Depends(operator)]
    ) -> EnrollmentOut:
        """Put a device in the registry (pending) and issue its one-time enrollment token."""
        issued = desk.issue(body.device_id, expires_in_s=body.expires_in_s, actor=actor)
        return EnrollmentOut(
            device=RegisteredOut.model_validate(issued.device),
            token=issued.token,
            expires_at=issued.expires_at,
        )

    @router.get("/v1/enrollments", tags=["enrollment"], dependencies=[viewer])
    def list_enrollments() -> list[RegisteredOut]:
        """Every enrolled device (pending, accepted, revoked), sorted by id."""
        return [RegisteredOut.model_validate(row) for row in desk.registry()]

    @router.post("/v1/enrollments/{device_id}/revoke", tags=["enrollment"])
    def revoke_enrollment(
        device_id: Annotated[str, _DEVICE_ID], actor: Annotated[Actor, Depends(operator)]
    ) -> RegisteredOut:
        """Remove a device's broker access (it is disconnected at once) and mark it revoked."""
        return RegisteredOut.model_validate(desk.revoke(device_id, actor=actor))

    @router.post(ENROLL_PATH, tags=["enrollment"])
    async def enroll(body: EnrollBody, request: Request) -> EnrolledOut:
        """A device redeems its enrollment token: no bearer token, rate-limited."""
        guard.refuse_if_cooling_down(request)
        enrollment = EnrollRequest(
            token=body.token, device_id=body.device_id, password=body.password, csr=body.csr
        )
        try:
            grant = await run_in_threadpool(desk.enroll, enrollment)
        except EnrollmentRefusedError as exc:
            raise guard.failed(request, "enrollment token refused", str(exc)) from None
        return EnrolledOut(
            device_id=grant.device_id,
            broker_url=grant.broker_url,
            broker_ca=grant.broker_ca,
            keyset=grant.keyset_b64,
            fleet=grant.fleet,
            certificate=grant.certificate,
        )
