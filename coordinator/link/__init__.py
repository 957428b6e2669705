"""The coordinator's link to the fleet: one MQTT connection and what it knows.

The hub holds the coordinator's MQTT connection (as the ``coordinator`` user), keeps the
fleet view from the devices' retained status messages and Last Wills (:mod:`.fleet`),
hands every decoded device message to its listeners, sends commands, and serves payloads
as broadcast chunks, answering devices' chunk requests from one sender thread
(:mod:`.chunk_sender`). Delivery, rollouts, federated rounds and the service are built on
it; nothing here knows about any of them.
"""
