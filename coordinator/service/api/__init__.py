"""The coordinator's HTTP API (``fedge coordinator serve``).

Workflow: the service builds an :class:`~coordinator.service.operations.Operations` object
and an ``authenticate`` callable (token -> :class:`~coordinator.service.operations.Actor`,
wrapping :meth:`coordinator.service.store.Store.authenticate`), calls :func:`create_app`
and hands the app to uvicorn. Each request is then

1. size-checked (:class:`~coordinator.service.api.app.BodyLimitMiddleware`: 413),
2. authenticated and role-checked (:mod:`coordinator.service.api.auth`: 401/403;
   an address with too many failed authentications gets 429,
   :mod:`coordinator.service.api.auth_limits`; each 401 is logged and audited),
3. validated and dispatched to one ``Operations`` method
   (:mod:`coordinator.service.api.routes`, shapes in :mod:`coordinator.service.api.schemas`),
4. answered with JSON, or with an error body
   ``{"error": {"code": ..., "message": ...}}`` (:mod:`coordinator.service.api.app`).

``GET /metrics`` exposes the fleet's figures to Prometheus
(:mod:`coordinator.service.api.metrics`), behind a token like every route but
``GET /v1/health``.

Routes (``viewer`` may call every GET, ``operator`` everything)::

    GET  /v1/health                              public liveness
    GET  /metrics                                Prometheus exposition
    GET  /v1/devices
    GET  /v1/devices/{device_id}/telemetry?limit=1..1000
    GET  /v1/devices/{device_id}/presence?limit=1..1000
    POST /v1/artifacts                           raw .fedge bytes -> 201
    GET  /v1/artifacts
    POST /v1/rollouts                            -> 201
    GET  /v1/rollouts
    GET  /v1/rollouts/{rollout_id}
    POST /v1/rollouts/{rollout_id}/pause
    POST /v1/rollouts/{rollout_id}/resume
    POST /v1/rollouts/{rollout_id}/abort         {"rollback": bool} optional
    POST /v1/runs                                -> 202
    GET  /v1/runs
    GET  /v1/runs/{run_id}
    POST /v1/runs/{run_id}/stop
    GET  /v1/audit?limit=1..1000

The package imports fastapi and prometheus-client; nothing under ``edge_agent``
or ``compress`` imports it.
"""

from coordinator.service.api.app import ApiConfig, create_app

__all__ = ["ApiConfig", "create_app"]
