"""Model monitoring on the coordinator: drift of the devices' inputs and outputs.

:mod:`.drift` holds the pure statistics (PSI, Jensen-Shannon, top features);
:mod:`.tracker` keeps the recent window summaries per device and model version and
scores them per device and fleet-wide. The service feeds the tracker from telemetry
ingest and persists its scores (:mod:`coordinator.service.store`).
"""
