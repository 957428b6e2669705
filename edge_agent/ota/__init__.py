"""Over-the-air model updates on the device, in the order an update flows.

* :mod:`~edge_agent.ota.updates`: the :class:`~edge_agent.ota.updates.Updater`
  takes deploy and rollback commands and chunks from the agent, and drives the rest.
* :mod:`~edge_agent.ota.staging`: a transfer's chunks assembled on disk,
  crash-safely, with a journal of verified chunks.
* :mod:`~edge_agent.ota.installer`: the trust decision on a deploy and the A/B
  install of a staged payload.
* :mod:`~edge_agent.ota.health`: the install-time health check against the
  manifest's reference inputs.
* :mod:`~edge_agent.ota.model_store`: the two slots and the state file that is the
  only commit point.
"""
