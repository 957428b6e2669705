"""``fedge keys publish`` without a broker: the chain is checked first, and cut to the newest."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.errors import RollbackError
from compress.keys import generate_signing_key
from compress.keyset import SignedKeySet
from coordinator.cli.app import app
from coordinator.link.keyset_chain import chain_message
from edge_agent.ota.keyset_store import KeySetStore
from tests.test_keyset_rotation_mqtt import A, B, C, D, keyset_file


def test_publish_refuses_a_broken_chain_before_connecting(tmp_path: Path) -> None:
    v1 = keyset_file(tmp_path, 1, [A, B], [A])
    v3 = keyset_file(tmp_path, 3, [C, D], [A, C])  # signed well, but v2 is missing
    forged_v2 = keyset_file(tmp_path, 2, [C], [C])  # not signed by v1's keys
    secret = tmp_path / "pw"
    secret.write_text("x")
    for chain, message in (([v1, v3], "skips versions"), ([v1, forged_v2], "current keys")):
        result = CliRunner().invoke(
            app,
            ["keys", "publish", "--broker", "mqtt://127.0.0.1:1", "--password-file", str(secret),
             *map(str, chain)],
        )  # fmt: skip
        assert result.exit_code != 0
        assert message in result.output
    assert SignedKeySet.from_bytes(v1.read_bytes()).keyset.version == 1


def test_the_published_chain_holds_the_newest_key_sets_and_still_catches_up(
    tmp_path: Path,
) -> None:
    """Ten versions: the message carries the newest eight (v3..v10); a device at v2 or
    later catches up from it, one at v1 is refused (it must be re-provisioned)."""
    signers = [generate_signing_key() for _ in range(10)]
    files = [keyset_file(tmp_path, 1, [signers[0]], [signers[0]])]
    for version in range(2, 11):
        old, new = signers[version - 2], signers[version - 1]
        files.append(keyset_file(tmp_path, version, [new], [old, new]))
    chain = [SignedKeySet.from_bytes(f.read_bytes()) for f in reversed(files)]  # any order
    message = chain_message(chain, now=datetime.now(UTC))
    versions = [SignedKeySet.from_bytes(b).keyset.version for b in message.keysets]
    assert versions == list(range(3, 11))

    now = datetime.now(UTC)
    data = tmp_path / "data"
    data.mkdir()
    at_v2 = KeySetStore.open(data, chain[-2], now=now)  # reversed: chain[-2] is v2
    assert at_v2.version == 2
    assert at_v2.receive(message.keysets, now=now)
    assert at_v2.version == 10
    behind = tmp_path / "behind"
    behind.mkdir()
    at_v1 = KeySetStore.open(behind, chain[-1], now=now)
    with pytest.raises(RollbackError, match="skips versions"):
        at_v1.apply(message.keysets, now=now)
