"""Monitoring on the device: input validation, per-window summaries, explanations.

* :mod:`~edge_agent.monitoring.validation`: every prediction's input is checked
  against the served model's input spec and reference profile (shape, dtype,
  NaN/inf, value range); a bad one is refused with
  :class:`~edge_agent.errors.InvalidInputError` and counted by reason.
* :mod:`~edge_agent.monitoring.summary`: :class:`SummaryWindow` counts the valid
  inputs' features in the profile's bins, the predicted classes and the confidence
  bins; :class:`ServingMonitor` keeps one window for the model being served and
  closes it with each telemetry record (the record's ``summary``).
* :mod:`~edge_agent.monitoring.explain`: occlusion attributions of one input,
  computed with the served model itself in one bounded runtime call
  (``Agent.explain``, ``POST /v1/explain``).

Pure numpy, vectorised; see docs/monitoring.md for the figures and the wire form.
"""

from edge_agent.monitoring.summary import ServingMonitor, SummaryWindow
from edge_agent.monitoring.validation import InputProblem, check_input, refusal

__all__ = ["InputProblem", "ServingMonitor", "SummaryWindow", "check_input", "refusal"]
