"""Built-in scenarios of ``fedge simulate --scenario``: the coordinator service and a
simulated fleet together in one process (:mod:`coordinator.scenario.drift_loop`).

This room sits above ``service`` and ``sim``: a scenario runs the service's
machinery (store, drift monitor, retraining policy, rollouts) against the agents
and data that ``sim`` provides.
"""
