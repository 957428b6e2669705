"""Serving on a device: the current model, the local HTTP API and inference telemetry.

:mod:`.server` holds the model that answers predictions (swapped atomically on install);
:mod:`.http_api` is the loopback JSON endpoint; :mod:`.telemetry` counts calls, errors
and latency per time window for the coordinator.
"""
