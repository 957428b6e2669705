"""The agent's MQTT link and the network loop that drives it.

:mod:`.mqtt` keeps one paho-mqtt client connected (reconnects with backoff, rebuilds the
Last Will every time); :mod:`.network_loop` drives any number of such links from one
epoll thread (one per device, one per 250 simulated agents).
"""
