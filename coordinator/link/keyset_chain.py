"""Publishing the key-set chain to the fleet, retained (``fedge keys publish``).

Devices provisioned with a key set (``trust.keyset``) subscribe for good to
``fedge/v1/broadcast/keyset`` and apply the versions above their own from the
:class:`~edge_agent.protocol.messages_keys.KeySetChain` retained there
(:mod:`edge_agent.ota.keyset_store`). Workflow:

1. :func:`check_chain` sorts the operator's key-set files by version and verifies
   them as a device would: the first is signed by a threshold of its own keys, each
   next one is its valid rotation (:func:`compress.keyset.verify_rotation_chain`:
   old and new thresholds, one version up), the last is unexpired. A broken chain is
   refused before anything is published.
2. :func:`publish_chain` publishes the newest ``limits.max_keyset_chain`` of them
   (oldest first), retained, as the ``coordinator`` (or an operator account), and
   waits for the broker's acknowledgement. Retained means every device gets it on
   its next (re)connect; a device that is further behind than the published chain
   reaches must be re-provisioned with a current key-set file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime

from compress.errors import KeySetError
from compress.keyset import SignedKeySet, verify_rotation_chain, verify_self_signed
from edge_agent.config.agent import BrokerConfig
from edge_agent.errors import BrokerError
from edge_agent.protocol import (
    COORDINATOR_SENDER,
    DEFAULT_LIMITS,
    KeySetChain,
    Limits,
    broadcast_topic,
    encode,
)
from edge_agent.protocol.topics import KEYSET_BROADCAST
from edge_agent.transport.mqtt import MqttLink

__all__ = ["chain_message", "check_chain", "publish_chain"]

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0


def check_chain(chain: Sequence[SignedKeySet], *, now: datetime) -> list[SignedKeySet]:
    """Sort key sets by version and verify them as one rotation chain.

    Returns:
        The key sets, oldest first.

    Raises:
        KeySetError: no key sets, or one that is not a valid key set.
        SignatureError: (a subclass) the first is not signed by a threshold of its
            own keys, or a rotation not by a threshold of the old or the new keys.
        RollbackError: two files of the same version, or a version missing.
        ExpiredError: the newest key set has expired.
    """
    if not chain:
        raise KeySetError("no key sets to publish")
    ordered = sorted(chain, key=lambda signed: signed.keyset.version)
    first = verify_self_signed(ordered[0])
    verify_rotation_chain(first, ordered[1:], now=now)
    return ordered


def chain_message(
    chain: Sequence[SignedKeySet], *, now: datetime, limits: Limits = DEFAULT_LIMITS
) -> KeySetChain:
    """The message to publish: the newest ``limits.max_keyset_chain`` of the checked chain.

    Raises:
        CompressError: the chain does not verify (see :func:`check_chain`).
    """
    ordered = check_chain(chain, now=now)
    return KeySetChain(
        keysets=tuple(signed.to_bytes() for signed in ordered[-limits.max_keyset_chain :])
    )


def publish_chain(
    broker: BrokerConfig,
    chain: Sequence[SignedKeySet],
    *,
    now: datetime,
    client_id: str,
    limits: Limits = DEFAULT_LIMITS,
    timeout: float = PUBLISH_TIMEOUT_S,
) -> list[SignedKeySet]:
    """Check ``chain`` (:func:`check_chain`) and publish its newest part, retained.

    Args:
        broker: The fleet's broker, as a coordinator account.
        chain: The key sets, in any order.
        now: The current time (timezone-aware), for the expiry check.
        client_id: The MQTT client id (:func:`coordinator.link.hub.hub_client_id`).
        limits: Protocol limits (how many key sets one message carries).
        timeout: Seconds to wait for the connection and for the acknowledgement.

    Returns:
        The key sets published, oldest first.

    Raises:
        CompressError: the chain does not verify (see :func:`check_chain`).
        BrokerError: no connection, or the broker did not acknowledge the message.
    """
    message = chain_message(chain, now=now, limits=limits)
    payload = encode(message, sender=COORDINATOR_SENDER, sent_at=time.time(), limits=limits)
    link = MqttLink(broker, client_id=client_id, subscriptions=(), on_message=_ignore)
    link.connect(timeout)
    try:
        topic = broadcast_topic(KEYSET_BROADCAST)
        if not link.publish_wait(topic, payload, retain=True, timeout=timeout):
            refusal = f"the broker did not acknowledge the key-set chain within {timeout:g}s"
            logger.error("%s", refusal)
            raise BrokerError(refusal)
    finally:
        link.stop()
    published = [SignedKeySet.from_bytes(blob) for blob in message.keysets]
    first, last = published[0].keyset.version, published[-1].keyset.version
    logger.info("published key sets v%d..v%d retained on %s", first, last, topic)
    return published


def _ignore(_topic: str, _payload: bytes, _retained: bool) -> None:
    """A publisher subscribes to nothing."""
