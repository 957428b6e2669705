"""The long-running coordinator service and what an operator can ask of it.

:mod:`.operations` defines :class:`~coordinator.service.operations.Operations`, the one
interface both front ends call; :mod:`.fleet_service` is its implementation (hub, store,
ingest, rollouts and runs in one object) and :mod:`.api_client` the same interface over
HTTP. :mod:`.api` serves it, :mod:`.store` keeps its state in SQLite, :mod:`.ingest`
writes telemetry and presence in batches, :mod:`.runs` runs federated runs in the
background, :mod:`.tokens` holds the API's roles and token rules, :mod:`.config` and
:mod:`.main` read the config and run ``fedge coordinator serve``.
"""
