"""The ``keyset_chain`` broadcast and the key-set version in ``status``: strict and bounded."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from compress.keys import generate_signing_key
from compress.keyset import MAX_SIGNED_KEYSET_BYTES, KeySet, SignedKeySet, sign_keyset
from edge_agent.errors import MalformedMessageError, MessageTooLargeError
from edge_agent.protocol import (
    COORDINATOR_SENDER,
    KeySetChain,
    Limits,
    Status,
    broadcast_topic,
    check_route,
    decode,
    encode,
)
from edge_agent.protocol.topics import KEYSET_BROADCAST
from tests.conftest import NOW
from tests.test_protocol_messages import header_of, reframe

KEY = generate_signing_key()


def signed_keyset(version: int) -> bytes:
    keyset = KeySet(
        version,
        (KEY.public_key,),
        1,
        created=NOW - timedelta(days=1),
        expires=NOW + timedelta(days=30),
    )
    return sign_keyset(keyset, [KEY]).to_bytes()


def wire(message: KeySetChain, limits: Limits | None = None) -> bytes:
    kwargs: dict[str, Any] = {} if limits is None else {"limits": limits}
    return encode(message, sender=COORDINATOR_SENDER, sent_at=1.0, **kwargs)


def test_a_chain_round_trips_on_the_keyset_broadcast() -> None:
    chain = KeySetChain(keysets=(signed_keyset(1), signed_keyset(2)))
    envelope = decode(wire(chain))
    assert envelope.message == chain
    check_route(envelope, broadcast_topic(KEYSET_BROADCAST))
    assert [SignedKeySet.from_bytes(b).keyset.version for b in envelope.message.keysets] == [1, 2]


def test_sizes_must_add_up_to_the_body() -> None:
    header, body = header_of(wire(KeySetChain(keysets=(signed_keyset(1), signed_keyset(2)))))
    header["data"]["sizes"] = [len(body) - 1]
    with pytest.raises(MalformedMessageError, match="does not match its sizes"):
        decode(reframe(header, body))
    with pytest.raises(MalformedMessageError):
        decode(reframe({**header, "data": {"sizes": []}}, b""))


def test_one_entry_may_not_exceed_a_signed_key_set() -> None:
    header, _body = header_of(wire(KeySetChain(keysets=(signed_keyset(1),))))
    big = b"x" * (MAX_SIGNED_KEYSET_BYTES + 1)
    header["data"]["sizes"] = [len(big)]
    with pytest.raises(MalformedMessageError):
        decode(reframe(header, big))


def test_count_and_bytes_are_bounded_by_the_limits() -> None:
    limits = Limits(max_keyset_chain=2, max_keyset_chain_bytes=4096)
    three = KeySetChain(keysets=tuple(signed_keyset(v) for v in (1, 2, 3)))
    payload = wire(three)  # fine with the default limits
    with pytest.raises(MessageTooLargeError, match="more than 2"):
        decode(payload, limits)
    header, _body = header_of(wire(KeySetChain(keysets=(signed_keyset(1),))))
    header["data"]["sizes"] = [3000, 3000]
    with pytest.raises(MessageTooLargeError):
        decode(reframe(header, b"y" * 6000), limits)


def test_status_reports_the_key_set_version_and_older_statuses_still_decode() -> None:
    status = Status(online=True, agent_version="0.1.0", keyset_version=3)
    payload = encode(status, sender="pi-1", sent_at=1.0)
    assert decode(payload).message == status
    header, body = header_of(payload)
    assert header["data"]["keyset_version"] == 3
    del header["data"]["keyset_version"]
    assert decode(reframe(header, body)).message == Status(online=True, agent_version="0.1.0")
    plain = encode(Status(online=True, agent_version="0.1.0"), sender="pi-1", sent_at=1.0)
    assert "keyset_version" not in header_of(plain)[0]["data"]
    header["data"]["keyset_version"] = 0
    with pytest.raises(MalformedMessageError):
        decode(reframe(header, body))
