"""Staged rollouts: a canary, then waves, each behind a health gate.

:mod:`.policy` holds the operator's typed settings; :mod:`.engine` is the pure state
machine (events and the time in, actions out; tested with a fake clock); :mod:`.manager`
is the adapter that feeds it the hub's reports and telemetry, sends its actions and saves
its snapshots in the service's store.
"""
