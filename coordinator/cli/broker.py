"""``fedge broker``: what the fleet's MQTT broker needs from fedge.

* ``acl`` prints the least-privilege mosquitto ACL (each device may publish only on
  its own status, events and telemetry topics and read only its own cmd and chunks
  topics and the broadcasts; the ``coordinator`` user reads and writes the whole
  tree). Save it as mosquitto's ``acl_file``; create one password per device (the
  device id as username) and one for ``coordinator`` with ``mosquitto_passwd``, and
  set ``allow_anonymous false``.
"""

from __future__ import annotations

import typer

from edge_agent.protocol import MOSQUITTO_ACL

app = typer.Typer(help="Broker setup for a fedge fleet.", no_args_is_help=True)


@app.command("acl")
def acl() -> None:
    """Print the mosquitto ACL file for a fedge fleet (least privilege per device)."""
    typer.echo(MOSQUITTO_ACL, nl=False)
