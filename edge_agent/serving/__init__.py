"""Serving the installed model on the device.

* :mod:`~edge_agent.serving.server`: :class:`~edge_agent.serving.server.ModelServer`
  holds the active model and runs predictions (thread-safe swaps on install).
* :mod:`~edge_agent.serving.http_api`: the local inference endpoint (JSON over
  HTTP, loopback by default); :mod:`~edge_agent.serving.http_bodies` parses and
  checks its request bodies.
* :mod:`~edge_agent.serving.telemetry`: per-window counters, latency quantiles and
  histograms that the agent publishes.
"""
