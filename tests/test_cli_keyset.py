"""``fedge keys keyset-init / rotate / keyset-inspect`` on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.keys import generate_signing_key, load_public_key, save_keypair
from compress.keyset import SignedKeySet
from coordinator.cli.app import app

runner = CliRunner()


def fedge(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    """Four key pairs: a/, b/, c/ and d/ (signing.key, signing.pub)."""
    for name in "abcd":
        save_keypair(generate_signing_key(), tmp_path / name)
    return tmp_path


def pub(keydir: Path, *names: str) -> list[str | Path]:
    return [arg for n in names for arg in ("--pub", keydir / n / "signing.pub")]


def sign(keydir: Path, *names: str) -> list[str | Path]:
    return [arg for n in names for arg in ("--sign", keydir / n / "signing.key")]


def key_id(keydir: Path, name: str) -> str:
    return load_public_key(keydir / name / "signing.pub").key_id


def init_v1(keydir: Path) -> Path:
    """A 2-of-3 key set of a, b and c, signed by a and b."""
    out = keydir / "keyset-v1.fedgekeys"
    code, text = fedge(
        "keys", "keyset-init", *pub(keydir, "a", "b", "c"), "--threshold", "2",
        *sign(keydir, "a", "b"), "--out", out,
    )  # fmt: skip
    assert code == 0, text
    assert "v1: 2 of 3 keys" in text
    return out


def test_init_rotate_inspect(keydir: Path) -> None:
    v1 = init_v1(keydir)
    code, text = fedge("keys", "keyset-inspect", v1)
    assert code == 0, text
    assert "self-signed" in text
    assert key_id(keydir, "c") in text

    # c is compromised: a and b rotate to a, b, d (d signs too, though a and b suffice).
    v2 = keydir / "keyset-v2.fedgekeys"
    code, text = fedge(
        "keys", "rotate", "--current", v1, *pub(keydir, "a", "b", "d"), "--threshold", "2",
        *sign(keydir, "a", "b", "d"), "--out", v2, "--expires-in-days", "30",
    )  # fmt: skip
    assert code == 0, text
    assert "from v1" in text

    code, text = fedge("keys", "keyset-inspect", v2, "--current", v1, "--json")
    assert code == 0, text
    report = json.loads(text)
    assert report["ok"] is True
    assert report["version"] == 2
    assert report["threshold"] == 2
    assert report["verified"] == "rotation from v1"
    assert report["key_ids"] == sorted(key_id(keydir, n) for n in "abd")
    assert SignedKeySet.from_bytes(v2.read_bytes()).keyset.version == 2

    code, text = fedge("keys", "keyset-inspect", v2)
    assert code == 0, text
    assert "pass --current with v1" in text


def test_refused_rotation_is_one_line(keydir: Path) -> None:
    v1 = init_v1(keydir)
    v2 = keydir / "keyset-v2.fedgekeys"
    code, text = fedge(
        "keys", "rotate", "--current", v1, *pub(keydir, "a", "d"), "--threshold", "1",
        *sign(keydir, "a", "d"), "--out", v2,
    )  # fmt: skip
    assert code == 1
    assert text.count("\n") == 1
    assert text.startswith("error: not signed by the current keys (key set v1)")
    assert "2 required" in text
    assert not v2.exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--current", "keyset-v1.fedgekeys", *("--sign", "d/signing.key")], "bad_keyset",
         "not in the current or the new key set"),
        (["--current", "a/signing.pub", *("--sign", "a/signing.key")], "bad_keyset",
         "bad magic"),
        (["--current", "missing.fedgekeys", *("--sign", "a/signing.key")], "bad_keyset",
         "no such key-set file"),
        (["--current", "keyset-v1.fedgekeys", *("--sign", "a/signing.key"), "--threshold", "3"],
         "bad_keyset", "threshold 3"),
        (["--current", "keyset-v1.fedgekeys", *("--sign", "a/signing.key"),
          *("--sign", "b/signing.key"), "--out", "keyset-v1.fedgekeys"], "bad_keyset",
         "already exists"),
    ],
)  # fmt: skip
def test_rotate_errors(keydir: Path, args: list[str], code: str, message: str) -> None:
    init_v1(keydir)
    base = [*pub(keydir, "a"), "--threshold", "1", "--out", keydir / "new.fedgekeys"]
    full = [keydir / a if a.endswith((".fedgekeys", ".key", ".pub")) else a for a in args]
    status, text = fedge("keys", "rotate", *base, *full, "--json")
    assert status == 1, text
    error = json.loads(text)["error"]
    assert error["code"] == code
    assert message in error["message"]


def test_inspect_refuses_a_replayed_rotation(keydir: Path) -> None:
    v1 = init_v1(keydir)
    code, text = fedge("keys", "keyset-inspect", v1, "--current", v1, "--json")
    assert code == 1
    assert json.loads(text)["error"]["code"] == "rollback"


def test_init_needs_its_own_threshold(keydir: Path) -> None:
    out = keydir / "v1.fedgekeys"
    code, text = fedge(
        "keys", "keyset-init", *pub(keydir, "a", "b"), "--threshold", "2",
        *sign(keydir, "a"), "--out", out,
    )  # fmt: skip
    assert code == 1
    assert "its own keys" in text
    assert "1 trusted signature(s) verify, 2 required" in text
    assert not out.exists()


@pytest.mark.parametrize("command", ["keyset-init", "rotate", "keyset-inspect"])
def test_help(command: str) -> None:
    code, text = fedge("keys", command, "--help")
    assert code == 0
    assert "key set" in text.lower()
