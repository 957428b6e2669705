"""The device agent: :class:`Agent` (one per device) and :func:`run_agent`.

* :mod:`edge_agent.agent.device`: the :class:`Agent` itself: its threads, the
  messages it routes to the updater and the training participant, its retained
  status and its reports (the module docstring has the workflow);
* :mod:`edge_agent.agent.telemetry_uplink`: closing telemetry windows into the
  on-disk spool and publishing it;
* :mod:`edge_agent.agent.runner`: the ``fedge-agent run`` entry point, until
  SIGTERM or SIGINT.
"""

from edge_agent.agent.device import Agent
from edge_agent.agent.runner import run_agent

__all__ = ["Agent", "run_agent"]
