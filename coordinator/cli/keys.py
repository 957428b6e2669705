"""``fedge keys``: create signing keys, show key ids, and build and rotate key sets.

``fedge keys generate --out keys/`` writes ``signing.key`` (mode 0600) and
``signing.pub`` and prints the key id; with ``--encrypt`` the private key is encrypted
with a password (from ``--key-password-file``, ``FEDGE_KEY_PASSWORD`` or asked twice at
the terminal; see :mod:`coordinator.cli.key_loading`). ``fedge keys id FILE`` prints
the key id of a public or private key file, so an operator can match a device's
trusted key to the signer without opening PEM files.

Key sets (:mod:`compress.keyset`) say which keys a device trusts and how many must
sign. ``fedge keys keyset-init`` writes a self-signed version 1 to provision devices
with; ``fedge keys rotate`` writes the next version, signed by a threshold of the
current keys and of the new ones (to add, replace or drop a key);
``fedge keys keyset-inspect`` verifies a key-set file (a rotation with ``--current``)
and shows it. Every file is checked as a device would check it before it is written.
The signing commands take ``--key-password-file`` for encrypted ``--sign`` keys, and
so does ``fedge keys id`` for an encrypted private key.
``fedge keys publish --broker URL KEYSET...`` (files, or a directory of them) checks
that the key sets form one rotation chain and publishes it, retained, to the devices
provisioned with a key set; they apply the versions above theirs
(:mod:`coordinator.link.keyset_chain`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from compress.errors import KeyFileError, KeyPasswordRequiredError, KeySetError
from compress.fileio import atomic_write, read_bounded
from compress.keys import (
    PublicKey,
    SigningKey,
    generate_signing_key,
    load_any_key,
    load_public_key,
    save_keypair,
)
from compress.keyset import (
    MAX_SIGNED_KEYSET_BYTES,
    KeySet,
    SignedKeySet,
    check_not_expired,
    sign_keyset,
    verify_initial_keyset,
    verify_rotation,
    verify_self_signed,
)
from compress.manifest import format_time
from coordinator.cli.key_loading import KeyPasswordFileOption, load_signing_keys, new_key_password
from coordinator.cli.options import Connection, JsonOption, with_broker
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.link.hub import hub_client_id
from coordinator.link.keyset_chain import publish_chain

app = typer.Typer(
    help="Create Ed25519 signing keys, show key ids, build and rotate key sets.",
    no_args_is_help=True,
)

PubsOption = Annotated[
    list[Path],
    typer.Option(
        "--pub", show_default=False, help="Public key of the new key set; repeat for each key."
    ),
]
ThresholdOption = Annotated[
    int,
    typer.Option(
        "--threshold", "-t", min=1, show_default=False, help="How many of the keys must sign."
    ),
]
SignOption = Annotated[
    list[Path],
    typer.Option("--sign", show_default=False, help="Private key to sign with; repeat for k of n."),
]
OutOption = Annotated[
    Path, typer.Option("--out", "-o", show_default=False, help="Key-set file to write.")
]
ExpiresOption = Annotated[
    int,
    typer.Option("--expires-in-days", min=1, max=36500, help="Days until the key set expires."),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")]


@app.command()
def generate(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", show_default=False, help="Directory for signing.key and signing.pub."
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files.")] = False,
    encrypt: Annotated[
        bool, typer.Option("--encrypt", help="Encrypt the private key with a password.")
    ] = False,
    key_password_file: KeyPasswordFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate an Ed25519 signing key (mode 0600) and its public key.

    With --encrypt the private key is encrypted with a password (at least 8 bytes) from
    --key-password-file, FEDGE_KEY_PASSWORD, or typed twice at the terminal.
    """
    with reported_errors(as_json=as_json):
        if key_password_file is not None and not encrypt:
            raise KeyFileError("--key-password-file needs --encrypt to encrypt the new key")
        password = new_key_password(key_password_file) if encrypt else None
        key = generate_signing_key()
        private_path, public_path = save_keypair(key, out, overwrite=force, password=password)
    if as_json:
        print_json({"ok": True, "key_id": key.key_id, "private_key": str(private_path),
                    "public_key": str(public_path), "encrypted": encrypt})  # fmt: skip
        return
    console.print(f"key id      {key.key_id}", highlight=False)
    secret = "encrypted, mode 0600" if encrypt else "mode 0600: keep it secret"
    console.print(f"private key {private_path}  ({secret})", highlight=False)
    console.print(f"public key  {public_path}  (copy to devices as a trusted key)", highlight=False)


@app.command("id")
def key_id(
    path: Annotated[
        Path, typer.Argument(show_default=False, help="A public (.pub) or private (.key) key file.")
    ],
    key_password_file: KeyPasswordFileOption = None,
) -> None:
    """Print the key id of a public or private key file.

    An encrypted private key needs its password (the .pub file does not).
    """
    with reported_errors():
        try:
            kid = load_any_key(path).key_id
        except KeyPasswordRequiredError:
            kid = load_signing_keys([path], key_password_file)[0].key_id
    typer.echo(kid)


def _read_keyset(path: Path) -> SignedKeySet:
    data = read_bounded(
        path, max_bytes=MAX_SIGNED_KEYSET_BYTES, error=KeySetError, what="key-set file"
    )
    try:
        signed = SignedKeySet.from_bytes(data)
        _ = signed.keyset
    except KeySetError as exc:
        raise KeySetError(f"{path}: {exc}") from exc
    return signed


def _write_keyset(path: Path, signed: SignedKeySet, *, overwrite: bool) -> None:
    try:
        atomic_write(path, signed.to_bytes(), overwrite=overwrite)
    except FileExistsError as exc:
        raise KeySetError(f"{path} already exists; pass --force to replace it") from exc
    except OSError as exc:
        raise KeySetError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _signers(
    paths: list[Path], password_file: Path | None, allowed: Iterable[PublicKey], what: str
) -> list[SigningKey]:
    """Load signing keys, refusing any whose signature could not count."""
    allowed_ids = {k.key_id for k in allowed}
    keys = load_signing_keys(paths, password_file)
    for path, key in zip(paths, keys, strict=True):
        if key.key_id not in allowed_ids:
            raise KeySetError(f"{path}: key {key.key_id[:16]} is not in {what}")
    return keys


def _build(version: int, pubs: list[Path], threshold: int, days: int, now: datetime) -> KeySet:
    return KeySet(
        version=version,
        keys=tuple(load_public_key(p) for p in pubs),
        threshold=threshold,
        created=now,
        expires=now + timedelta(days=days),
    )


def _report(keyset: KeySet, signed: SignedKeySet, as_json: bool, **facts: str) -> None:
    """Print a key set's summary, with ``facts`` (``wrote=...``, ``verified=...``) first."""
    summary: dict[str, Any] = {
        **facts,
        "version": keyset.version,
        "threshold": keyset.threshold,
        "key_ids": list(keyset.key_ids),
        "created": format_time(keyset.created),
        "expires": format_time(keyset.expires),
        "signatures": sorted(s.key_id for s in signed.signatures),
    }
    if as_json:
        print_json({"ok": True, **summary})
        return
    for name, value in facts.items():
        console.print(f"{name:<10} {value}", highlight=False)
    console.print(
        f"{'key set':<10} v{keyset.version}: {keyset.threshold} of {len(keyset.keys)} keys sign",
        highlight=False,
    )
    console.print(f"{'valid':<10} {summary['created']} to {summary['expires']}", highlight=False)
    for kid in keyset.key_ids:
        console.print(f"{'key':<10} {kid}", highlight=False)
    for kid in summary["signatures"]:
        console.print(f"{'signature':<10} {kid}", highlight=False)


@app.command("keyset-init")
def keyset_init(
    pubs: PubsOption,
    threshold: ThresholdOption,
    sign: SignOption,
    out: OutOption,
    expires_in_days: ExpiresOption = 365,
    force: ForceOption = False,
    key_password_file: KeyPasswordFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a version-1 key set, signed by at least THRESHOLD of its own keys.

    Provision devices with the file; later versions come from 'fedge keys rotate'.
    """
    with reported_errors(as_json=as_json):
        now = datetime.now(UTC)
        keyset = _build(1, pubs, threshold, expires_in_days, now)
        signed = sign_keyset(keyset, _signers(sign, key_password_file, keyset.keys, "the key set"))
        verify_initial_keyset(signed, now=now)
        _write_keyset(out, signed, overwrite=force)
    _report(keyset, signed, as_json, wrote=str(out))


@app.command()
def rotate(
    current: Annotated[
        Path,
        typer.Option("--current", show_default=False, help="The key-set file devices trust now."),
    ],
    pubs: PubsOption,
    threshold: ThresholdOption,
    sign: SignOption,
    out: OutOption,
    expires_in_days: ExpiresOption = 365,
    force: ForceOption = False,
    key_password_file: KeyPasswordFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write the next key set version, signed by the current keys and the new ones.

    Sign with at least the current threshold of the current keys and at least THRESHOLD
    of the new keys (a key in both sets counts for both). To drop a lost or compromised
    key, leave it out of --pub and sign with the others.
    """
    with reported_errors(as_json=as_json):
        now = datetime.now(UTC)
        old = verify_self_signed(_read_keyset(current))
        keyset = _build(old.version + 1, pubs, threshold, expires_in_days, now)
        allowed = (*old.keys, *keyset.keys)
        signers = _signers(sign, key_password_file, allowed, "the current or the new key set")
        signed = sign_keyset(keyset, signers)
        verify_rotation(old, signed, now=now)
        _write_keyset(out, signed, overwrite=force)
    _report(keyset, signed, as_json, wrote=str(out), rotated=f"from v{old.version}")


@app.command("keyset-inspect")
def keyset_inspect(
    path: Annotated[Path, typer.Argument(show_default=False, help="A key-set file.")],
    current: Annotated[
        Path | None,
        typer.Option(
            "--current",
            show_default=False,
            help="The key set before it: verify PATH as the rotation from it.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Verify a key-set file and show its version, threshold and key ids.

    Without --current the file must be signed by a threshold of its own keys; with
    --current it must also be the valid next version of that key set.
    """
    with reported_errors(as_json=as_json):
        now = datetime.now(UTC)
        signed = _read_keyset(path)
        if current is None:
            keyset = verify_self_signed(signed)
            check_not_expired(keyset, now=now)
            verified = "self-signed"
            if keyset.version > 1:
                verified += f"; pass --current with v{keyset.version - 1} to check the rotation"
        else:
            old = verify_self_signed(_read_keyset(current))
            keyset = verify_rotation(old, signed, now=now)
            verified = f"rotation from v{old.version}"
    _report(keyset, signed, as_json, verified=verified)


def _keyset_files(paths: list[Path]) -> list[Path]:
    """The files given, with each directory replaced by the regular files in it."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file()))
        else:
            files.append(path)
    if not files:
        raise KeySetError("no key-set files: give files or a directory that holds them")
    return files


@app.command()
@with_broker
def publish(
    connection: Connection,
    paths: Annotated[
        list[Path],
        typer.Argument(
            show_default=False, help="Key-set files (v1 up to the newest), or a directory of them."
        ),
    ],
    as_json: JsonOption = False,
) -> None:
    """Publish the key-set chain to the devices (retained on the broker).

    The files must form one rotation chain (each version signed by the keys of the
    one before and its own); a broken chain is refused and nothing is published.
    Devices provisioned with a key set apply the versions above theirs, also after
    being offline across several rotations.
    """
    with reported_errors(as_json=as_json):
        now = datetime.now(UTC)
        chain = [_read_keyset(path) for path in _keyset_files(paths)]
        broker = connection.broker_config()
        published = publish_chain(
            broker,
            chain,
            now=now,
            client_id=hub_client_id(broker.username, None),
            timeout=connection.connect_timeout,
        )
    newest = published[-1]
    _report(
        newest.keyset,
        newest,
        as_json,
        published=f"v{published[0].keyset.version}..v{newest.keyset.version} to {broker.url}",
    )
