"""How the agent reaches the broker, and how anything typed as an address is read.

* :mod:`~edge_agent.transport.address`: the one ``host:port`` parser (broker URLs,
  the agent's ``--http``, the coordinator's ``--bind``).
* :mod:`~edge_agent.transport.link`: :class:`~edge_agent.transport.link.DeviceLink`,
  the Protocol the agent, its updater and its round participant use, and
  :class:`~edge_agent.transport.link.Will`.
* :mod:`~edge_agent.transport.mqtt`: :class:`~edge_agent.transport.mqtt.MqttLink`,
  the paho-mqtt implementation (the only module that imports paho), driven by a
  :class:`~edge_agent.transport.network_loop.NetworkLoop` (one per link, or one
  shared by a simulated fleet).
* :mod:`~edge_agent.transport.memory`: :class:`~edge_agent.transport.memory.MemoryLink`
  on a :class:`~edge_agent.transport.memory.MemoryBroker`, the in-process twin for
  tests; tests/test_transport_link_contract.py holds both links to one contract.
"""
