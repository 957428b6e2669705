"""``fedge keys``: create signing keys and show key ids.

``fedge keys generate --out keys/`` writes ``signing.key`` (mode 0600) and
``signing.pub`` and prints the key id; ``fedge keys id FILE`` prints the key id of a
public or private key file, so an operator can match a device's trusted key to the
signer without opening PEM files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compress.keys import generate_signing_key, load_any_key, save_keypair
from coordinator.cli.output import console, print_json, reported_errors

app = typer.Typer(help="Create Ed25519 signing keys and show key ids.", no_args_is_help=True)


@app.command()
def generate(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", show_default=False, help="Directory for signing.key and signing.pub."
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Generate an Ed25519 signing key (mode 0600) and its public key."""
    with reported_errors(as_json=as_json):
        key = generate_signing_key()
        private_path, public_path = save_keypair(key, out, overwrite=force)
    if as_json:
        print_json({"ok": True, "key_id": key.key_id, "private_key": str(private_path),
                    "public_key": str(public_path)})  # fmt: skip
        return
    console.print(f"key id      {key.key_id}", highlight=False)
    console.print(f"private key {private_path}  (mode 0600: keep it secret)", highlight=False)
    console.print(f"public key  {public_path}  (copy to devices as a trusted key)", highlight=False)


@app.command("id")
def key_id(
    path: Annotated[
        Path, typer.Argument(show_default=False, help="A public (.pub) or private (.key) key file.")
    ],
) -> None:
    """Print the key id of a public or private key file."""
    with reported_errors():
        kid = load_any_key(path).key_id
    typer.echo(kid)
