"""Evicting a connected client-certificate device from mosquitto (revocation, mutual TLS).

Why: on SIGHUP mosquitto 2.0 re-reads its CRL, so a revoked certificate cannot
connect again, but it re-checks only password accounts of the clients already
connected: a device whose certificate was just revoked stays connected
(``tests/test_broker_config.py`` shows it). On a broker from ``fedge broker config
--cafile`` the certificate's CN is the username and the username is the client id,
so a new connection with a certificate for the same CN takes that client id over:
mosquitto disconnects the device. :func:`evict` makes that connection with a
short-lived certificate from the fleet's CA (the caller issues it, and revokes it
after, with the device's), then disconnects at once with a clean session, which
also discards the device's persistent session.

Workflow (:meth:`coordinator.service.enrollment.EnrollmentDesk.revoke`): revoke the
device's certificates and reload (no reconnection), issue an eviction certificate
for its CN, :func:`evict`, revoke again and reload (the eviction certificate too).
"""

from __future__ import annotations

import logging
from pathlib import Path

from coordinator.errors import BrokerSetupError
from edge_agent.config.agent import BrokerConfig, parse_broker_url
from edge_agent.errors import AgentError
from edge_agent.transport.mqtt import MqttLink

__all__ = ["EVICT_TIMEOUT_S", "evict"]

logger = logging.getLogger(__name__)

EVICT_TIMEOUT_S = 10.0
"""How long the eviction connection may take."""


def evict(
    broker_url: str,
    device_id: str,
    *,
    ca_file: Path | None,
    cert_file: Path,
    key_file: Path,
    timeout_s: float = EVICT_TIMEOUT_S,
) -> None:
    """Take over ``device_id``'s connection with a certificate for its CN, then leave.

    Args:
        broker_url: The broker (``mqtts://``), as this machine reaches it.
        device_id: The device (its certificate's CN, its username and client id).
        ca_file: The CA that verifies the broker's certificate (None: the system's).
        cert_file: A valid certificate with CN ``device_id`` from the fleet's CA.
        key_file: Its key.
        timeout_s: Seconds to wait for the connection.

    Raises:
        BrokerSetupError: the URL is not TLS, or the connection failed.
    """
    try:
        host, port, tls = parse_broker_url(broker_url)
    except AgentError as exc:
        raise _fail(f"cannot evict {device_id}: {exc}") from None
    if not tls:
        raise _fail(f"cannot evict {device_id} by certificate over {broker_url}: not mqtts://")
    config = BrokerConfig(
        host=host,
        port=port,
        tls=True,
        username=device_id,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )
    link = MqttLink(
        config,
        client_id=device_id,
        subscriptions=(),
        on_message=lambda _topic, _payload, _retained: None,
        clean_session=True,
    )
    try:
        link.connect(timeout_s)
    except AgentError as exc:
        raise _fail(f"cannot evict {device_id}: {exc}") from None
    finally:
        link.stop()
    logger.info("evicted %s from the broker (took over its client id)", device_id)


def _fail(message: str) -> BrokerSetupError:
    logger.error("eviction failed: %s", message)
    return BrokerSetupError(message)
