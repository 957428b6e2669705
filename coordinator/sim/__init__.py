"""``fedge simulate``: a whole fleet on one machine.

:mod:`.simulate` runs the job from data to a rolled-out model; :mod:`.local_fleet` starts
real agents in this process (sharing a few network threads); :mod:`.datasets` holds the
reference datasets and their splits; :mod:`.embedded_broker` runs an MQTT broker (amqtt)
inside the process.
"""
