"""Key generation, files, permissions and key ids."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from compress.errors import (
    KeyFileError,
    KeyPasswordError,
    KeyPasswordRequiredError,
    WrongKeyPasswordError,
)
from compress.keys import (
    PublicKey,
    SigningKey,
    generate_signing_key,
    load_any_key,
    load_public_key,
    load_signing_key,
    save_keypair,
)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    key = generate_signing_key()
    private_path, public_path = save_keypair(key, tmp_path / "keys")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert load_signing_key(private_path).key_id == key.key_id
    assert load_public_key(public_path) == key.public_key


def test_key_id_is_sha256_of_raw_public_key() -> None:
    key = generate_signing_key()
    assert key.key_id == hashlib.sha256(key.public_key.raw).hexdigest()
    assert len(key.key_id) == 64


def test_signatures_verify_only_for_the_signed_data() -> None:
    key = generate_signing_key()
    sig = key.sign(b"hello")
    assert key.public_key.verify(sig, b"hello")
    assert not key.public_key.verify(sig, b"hellO")
    assert not generate_signing_key().public_key.verify(sig, b"hello")


def test_refuses_to_overwrite_existing_keys(tmp_path: Path) -> None:
    first = generate_signing_key()
    save_keypair(first, tmp_path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        save_keypair(generate_signing_key(), tmp_path)
    assert load_signing_key(tmp_path / "signing.key").key_id == first.key_id
    second = generate_signing_key()
    save_keypair(second, tmp_path, overwrite=True)
    assert load_signing_key(tmp_path / "signing.key").key_id == second.key_id


def test_unwritable_directory_is_a_key_file_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(KeyFileError, match="cannot write keys"):
        save_keypair(generate_signing_key(), blocker / "keys")


@pytest.mark.parametrize(
    ("content", "loader", "match"),
    [
        (b"garbage", load_public_key, "not a PEM public key"),
        (b"garbage", load_signing_key, "not a PEM private key"),
        (None, load_public_key, "no such key file"),
        (None, load_signing_key, "no such key file"),
    ],
)
def test_bad_key_files(tmp_path: Path, content: bytes | None, loader: object, match: str) -> None:
    path = tmp_path / "k.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeyFileError, match=match):
        loader(path)  # type: ignore[operator]


def test_wrong_kind_of_key_is_rejected(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "rsa.key"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "rsa.pub"
    public.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_signing_key(private)
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_public_key(public)


def test_private_key_is_not_a_public_key(tmp_path: Path) -> None:
    private_path, _ = save_keypair(generate_signing_key(), tmp_path)
    with pytest.raises(KeyFileError):
        load_public_key(private_path)


def test_oversized_and_directory_key_files(tmp_path: Path) -> None:
    big = tmp_path / "big.pub"
    big.write_bytes(b"x" * 100_000)
    with pytest.raises(KeyFileError, match="too large"):
        load_public_key(big)
    with pytest.raises(KeyFileError, match="directory"):
        load_public_key(tmp_path)


def test_loose_permissions_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    private_path, _ = save_keypair(generate_signing_key(), tmp_path)
    private_path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="compress.keys"):
        load_signing_key(private_path)
    assert "readable by others" in caplog.text


def test_public_key_must_be_32_bytes() -> None:
    with pytest.raises(KeyFileError):
        PublicKey(b"short")


def test_pem_round_trip() -> None:
    key = generate_signing_key()
    assert SigningKey.from_pem(key.to_pem()).key_id == key.key_id
    assert PublicKey.from_pem(key.public_key.to_pem()) == key.public_key


def test_special_files_are_refused_without_reading(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_public_key(Path("/dev/zero"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_public_key(fifo)


def test_unsupported_algorithms_are_key_file_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*args: object, **kwargs: object) -> None:
        raise UnsupportedAlgorithm("curve SM2 is not supported")

    pem = tmp_path / "sm2.pub"
    pem.write_bytes(generate_signing_key().public_key.to_pem())
    monkeypatch.setattr(serialization, "load_pem_public_key", unsupported)
    monkeypatch.setattr(serialization, "load_pem_private_key", unsupported)
    with pytest.raises(KeyFileError, match="SM2"):
        load_public_key(pem)
    with pytest.raises(KeyFileError, match="SM2"):
        load_signing_key(pem)


def test_load_any_key_reads_either_kind(tmp_path: Path) -> None:
    key = generate_signing_key()
    private_path, public_path = save_keypair(key, tmp_path)
    assert load_any_key(private_path) == key.public_key
    assert load_any_key(public_path) == key.public_key
    (tmp_path / "junk").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n")
    with pytest.raises(KeyFileError, match="private key"):
        load_any_key(tmp_path / "junk")


def test_generate_into_a_file_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(KeyFileError, match="not a directory"):
        save_keypair(generate_signing_key(), target)


def test_unparseable_private_key_does_not_warn_about_permissions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(b"garbage")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="compress.keys"), pytest.raises(KeyFileError):
        load_signing_key(path)
    assert "readable by others" not in caplog.text


PASSWORD = b"correct horse battery"


def test_encrypted_key_round_trip(tmp_path: Path) -> None:
    key = generate_signing_key()
    private_path, public_path = save_keypair(key, tmp_path, password=PASSWORD)
    data = private_path.read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert key.to_pem() not in data
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert load_signing_key(private_path, PASSWORD).key_id == key.key_id
    assert load_public_key(public_path) == key.public_key
    assert SigningKey.from_pem(key.to_pem(PASSWORD), PASSWORD).key_id == key.key_id


def test_encrypted_key_without_password_says_how_to_give_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private_path, _ = save_keypair(generate_signing_key(), tmp_path, password=PASSWORD)
    with caplog.at_level(logging.INFO, logger="compress.keys"):
        with pytest.raises(KeyPasswordRequiredError, match="--key-password-file") as info:
            load_signing_key(private_path)
        with pytest.raises(KeyPasswordRequiredError):
            load_signing_key(private_path, b"")
    assert str(private_path) in str(info.value)
    assert info.value.code == "key_password_required"
    assert "is encrypted and no password was given" in caplog.text


def test_wrong_password_is_a_typed_error_without_library_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private_path, _ = save_keypair(generate_signing_key(), tmp_path, password=PASSWORD)
    with (
        caplog.at_level(logging.WARNING, logger="compress.keys"),
        pytest.raises(WrongKeyPasswordError, match="does not decrypt") as info,
    ):
        load_signing_key(private_path, b"not the password")
    assert isinstance(info.value, KeyFileError)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert "Incorrect password" not in str(info.value)
    assert "wrong password" in caplog.text


def test_a_password_is_ignored_for_an_unencrypted_key(tmp_path: Path) -> None:
    key = generate_signing_key()
    private_path, _ = save_keypair(key, tmp_path)
    assert load_signing_key(private_path, PASSWORD).key_id == key.key_id


def test_short_passwords_do_not_encrypt_a_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="compress.keys"),
        pytest.raises(KeyPasswordError, match="at least 8 bytes"),
    ):
        save_keypair(generate_signing_key(), tmp_path, password=b"short")
    assert not (tmp_path / "signing.key").exists()
    assert "refused a key password of 5 bytes" in caplog.text


def test_encrypted_key_file_permissions_are_still_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private_path, _ = save_keypair(generate_signing_key(), tmp_path, password=PASSWORD)
    private_path.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="compress.keys"):
        load_signing_key(private_path, PASSWORD)
    assert "readable by others" in caplog.text
