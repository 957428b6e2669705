"""Federated runs: rounds of a Flower strategy over the fleet, through MQTT.

:mod:`.runs` drives the rounds (sampling, deadlines, evaluation, reports); :mod:`.grid` is
Flower's ``Grid`` over fedge's protocol, so any Flower strategy runs unchanged and devices
need no flwr; :mod:`.strategies` names the strategies; :mod:`.update_check` (pure) checks
every update before anything is aggregated.
"""
