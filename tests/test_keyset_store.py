"""The device's key-set store: provisioning, rotation chains, replay refusal, atomic storage."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from compress.artifact import read_artifact_unverified
from compress.errors import ExpiredError, RollbackError, ThresholdError, UnknownKeyError
from compress.keys import SigningKey, generate_signing_key, save_keypair
from compress.keyset import KeySet, SignedKeySet, sign_keyset
from compress.signing import TrustedKeys, sign_manifest, verify_signatures
from edge_agent import cli
from edge_agent.config.agent import AgentConfig
from edge_agent.config.sections import TrustConfig
from edge_agent.errors import ConfigError, StateError, UntrustedModelError
from edge_agent.ota import keyset_store
from edge_agent.ota.keyset_store import KEYSET_PATH, KeySetStore, load_trust
from edge_agent.ota.model_store import ModelStore
from edge_agent.ota.reverify import verify_installed
from tests.conftest import NOW, make_manifest
from tests.fleet_support import make_artifact
from tests.ota_support import place_model

A, B, C, D, E = (generate_signing_key() for _ in range(5))


def keyset(version: int, keys: list[SigningKey], threshold: int = 2, days: int = 365) -> KeySet:
    return KeySet(
        version,
        tuple(k.public_key for k in keys),
        threshold,
        created=NOW - timedelta(days=1),
        expires=NOW + timedelta(days=days),
    )


V1 = sign_keyset(keyset(1, [A, B, C]), [A, B])
V2 = sign_keyset(keyset(2, [B, C, D]), [B, C])  # A retired: B and C sign for both sets
V3 = sign_keyset(keyset(3, [C, D, E]), [C, D])  # B retired
V4 = sign_keyset(keyset(4, [D, E]), [D, E])  # C retired


def provision(tmp_path: Path, signed: SignedKeySet) -> TrustConfig:
    path = tmp_path / f"provisioned-v{signed.keyset.version}.keyset"
    path.write_bytes(signed.to_bytes())
    return TrustConfig(keyset=path)


def open_store(tmp_path: Path, signed: SignedKeySet = V1) -> KeySetStore:
    (tmp_path / "data").mkdir(exist_ok=True)
    store = load_trust(provision(tmp_path, signed), tmp_path / "data", now=NOW)
    assert isinstance(store, KeySetStore)
    return store


@pytest.fixture
def data(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def test_fixed_keys_without_a_key_set(tmp_path: Path, data: Path) -> None:
    _private, public = save_keypair(A, tmp_path / "keys")
    trusted = load_trust(TrustConfig(keys=(public,)), data, now=NOW)
    assert isinstance(trusted, TrustedKeys)
    assert not (data / KEYSET_PATH).exists()


def test_first_start_trusts_and_stores_the_provisioned_key_set(tmp_path: Path, data: Path) -> None:
    store = open_store(tmp_path)
    assert store.version == 1
    assert store.current() == V1.keyset.trusted()
    assert (data / KEYSET_PATH).read_bytes() == V1.to_bytes()


def test_a_chain_catches_up_over_several_rotations_and_is_stored(
    tmp_path: Path, data: Path
) -> None:
    store = open_store(tmp_path)
    assert store.receive([V1.to_bytes(), V2.to_bytes(), V3.to_bytes()], now=NOW)
    assert store.version == 3
    assert store.current() == V3.keyset.trusted()
    assert (data / KEYSET_PATH).read_bytes() == V3.to_bytes()
    assert open_store(tmp_path).version == 3  # a restart keeps it


def test_a_stale_provisioning_file_never_rolls_trust_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    open_store(tmp_path).receive([V2.to_bytes()], now=NOW)
    with caplog.at_level(logging.INFO, logger=keyset_store.__name__):
        again = open_store(tmp_path, V1)
    assert again.version == 2
    assert "trusting the stored key set v2 (trust.keyset is the older v1)" in caplog.text


def test_a_newer_provisioning_file_reprovisions(tmp_path: Path, data: Path) -> None:
    open_store(tmp_path)
    store = open_store(tmp_path, V3)  # e.g. enrollment after two rotations
    assert store.version == 3
    assert (data / KEYSET_PATH).read_bytes() == V3.to_bytes()


def test_the_retained_chain_again_changes_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    chain = [V1.to_bytes(), V2.to_bytes()]
    assert store.receive(chain, now=NOW)
    assert store.apply(chain, now=NOW) is None
    assert not store.receive(chain, now=NOW)
    assert store.version == 2


def test_a_replayed_older_key_set_is_refused_and_logged(
    tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(tmp_path)
    store.receive([V2.to_bytes(), V3.to_bytes()], now=NOW)
    with pytest.raises(RollbackError, match="a replayed key set"):
        store.apply([V1.to_bytes(), V2.to_bytes()], now=NOW)
    with caplog.at_level(logging.WARNING, logger=keyset_store.__name__):
        assert not store.receive([V2.to_bytes()], now=NOW)
    assert "refused the key-set chain: rollback" in caplog.text
    assert "still trusting key set v3" in caplog.text
    assert store.version == 3
    assert (data / KEYSET_PATH).read_bytes() == V3.to_bytes()


def test_a_chain_that_skips_a_version_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    skipping = sign_keyset(keyset(3, [A, B, C]), [A, B])  # the current keys sign a v3
    with pytest.raises(RollbackError, match="skips versions"):
        store.apply([skipping.to_bytes()], now=NOW)
    assert store.version == 1


def test_a_key_set_not_signed_by_the_current_keys_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    forged = sign_keyset(keyset(2, [D, E]), [D, E])  # the attacker's own keys only
    with pytest.raises(UnknownKeyError):
        store.apply([forged.to_bytes()], now=NOW)
    one_old = sign_keyset(keyset(2, [A, D, E]), [A, D, E])  # one of the two old keys
    with pytest.raises(ThresholdError):
        store.apply([one_old.to_bytes()], now=NOW)
    assert store.current() == V1.keyset.trusted()


def test_an_expired_rotation_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(ExpiredError):
        store.apply([V2.to_bytes()], now=NOW + timedelta(days=400))
    assert store.version == 1


def test_after_a_rotation_the_retired_key_signs_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    old = sign_manifest(make_manifest(), [A, B])
    verify_signatures(old, store.current())
    store.receive([V2.to_bytes()], now=NOW)
    with pytest.raises(ThresholdError):  # B is still trusted, A's signature no longer counts
        verify_signatures(old, store.current())
    verify_signatures(sign_manifest(make_manifest(), [B, D]), store.current())


def test_a_failed_write_leaves_the_old_key_set_in_force(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)

    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keyset_store, "atomic_write", disk_full)
    with pytest.raises(StateError, match="cannot store the key set"):
        store.apply([V2.to_bytes()], now=NOW)
    assert store.version == 1
    assert (data / KEYSET_PATH).read_bytes() == V1.to_bytes()


def test_an_unusable_provisioning_file_is_a_config_error(tmp_path: Path, data: Path) -> None:
    unsigned = sign_keyset(keyset(1, [A, B, C]), [A])  # 1 of the 2 needed
    with pytest.raises(ConfigError, match=r"trust\.keyset"):
        open_store(tmp_path, unsigned)
    expired = sign_keyset(keyset(1, [A, B], days=1), [A, B])
    with pytest.raises(ConfigError, match="expired"):
        load_trust(provision(tmp_path, expired), data, now=NOW + timedelta(days=2))
    garbage = tmp_path / "garbage.keyset"
    garbage.write_bytes(b"not a key set")
    with pytest.raises(ConfigError, match=r"trust\.keyset"):
        load_trust(TrustConfig(keyset=garbage), data, now=NOW)
    assert not (data / KEYSET_PATH).exists()


def test_a_damaged_stored_key_set_stops_the_agent(tmp_path: Path, data: Path) -> None:
    open_store(tmp_path)
    (data / KEYSET_PATH).write_bytes(b"FKS1 garbage")
    with pytest.raises(StateError, match="not a signed key set"):
        open_store(tmp_path)
    forged = sign_keyset(keyset(5, [D, E]), [D])  # below its own threshold
    (data / KEYSET_PATH).write_bytes(forged.to_bytes())
    with pytest.raises(StateError, match="does not verify"):
        open_store(tmp_path)


def test_an_installed_model_signed_only_by_a_retired_key_is_not_trusted_after_the_rotation(
    tmp_path: Path, data: Path
) -> None:
    """The documented answer: the next start-up re-verification refuses it (re-sign and
    redeploy with current keys); a model signed by a key still trusted stays served."""
    one_of_ab = sign_keyset(keyset(1, [A, B], threshold=1), [A])
    one_of_bc = sign_keyset(keyset(2, [B, C], threshold=1), [A, B])  # A retired
    store = open_store(tmp_path, one_of_ab)
    signed, payload = read_artifact_unverified(make_artifact(tmp_path, A, version=1))
    model = place_model(data, (signed, payload))
    now = datetime.now(UTC)
    verify_installed(ModelStore(data), model, trusted=store.current(), now=now)

    assert store.receive([one_of_bc.to_bytes()], now=NOW)
    with pytest.raises(UntrustedModelError) as refused:
        verify_installed(ModelStore(data), model, trusted=store.current(), now=now)
    assert refused.value.cause_code == "unknown_key"

    resigned = place_model(data, (sign_manifest(signed.manifest, [B]), payload))
    assert verify_installed(ModelStore(data), resigned, trusted=store.current(), now=now)


def test_fedge_agent_run_takes_a_key_set_instead_of_keys_and_checks_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[AgentConfig] = []
    monkeypatch.setattr(cli, "run_agent", lambda config, **_kw: started.append(config) or 0)
    monkeypatch.setattr(logging, "basicConfig", lambda **_kw: None)  # leave pytest's logging
    base = ["run", "--device-id", "pi-1", "--broker", "mqtt://127.0.0.1:1883"]
    base += ["--data-dir", str(tmp_path / "data")]
    good = provision(tmp_path, V1).keyset
    assert good is not None
    assert cli.main([*base, "--keyset", str(good)]) == 0  # no --trust needed
    assert [c.trust.keyset for c in started] == [good]

    garbage = tmp_path / "garbage.keyset"
    garbage.write_bytes(b"not a key set")
    assert cli.main([*base, "--keyset", str(garbage)]) == 2
    assert "trust.keyset" in capsys.readouterr().err
    assert len(started) == 1
