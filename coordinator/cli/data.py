"""``fedge data``: example datasets, split over devices as agents read them.

``fedge data digits --clients 10 --alpha 0.5 --out DIR`` loads scikit-learn's
bundled digits (no download), keeps a stratified 30 % as ``DIR/test.npz`` (for
``fedge train --eval-data``) and splits the rest over the devices with
Dirichlet(``alpha``) label skew: ``DIR/shard<i>/local.npz``, each the directory one
``fedge-agent run --train-data`` reads. Seeded, so the same command gives the same
files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from coordinator.cli.options import JsonOption
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.errors import RunError
from coordinator.sim.datasets import load_digits_split
from coordinator.sim.local_fleet import write_shards

app = typer.Typer(
    help="Example datasets split over devices (Dirichlet label skew).", no_args_is_help=True
)


@app.command()
def digits(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (created).")],
    clients: Annotated[int, typer.Option(min=1, max=1000, help="Devices to split over.")] = 10,
    alpha: Annotated[
        float, typer.Option(min=0.001, help="Dirichlet concentration: small = skewed labels.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(min=0, help="Split seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Write digits shards (one directory per device) and a held-out test.npz."""
    with reported_errors(as_json=as_json):
        x_train, y_train, x_test, y_test = load_digits_split(seed)
        try:
            shards = write_shards(
                x_train, y_train, clients=clients, alpha=alpha, directory=out, seed=seed
            )
        except (ValueError, OSError) as exc:
            raise RunError(f"cannot write the shards: {exc}") from exc
        np.savez(out / "test.npz", x=x_test, y=y_test)
    sizes = [_examples(s / "local.npz") for s in shards]
    if as_json:
        print_json(
            {
                "ok": True,
                "test": str(out / "test.npz"),
                "shards": [str(s) for s in shards],
                "examples": sizes,
            }
        )
        return
    console.print(
        f"wrote {len(shards)} shards to {out} ({min(sizes)}-{max(sizes)} examples each) "
        f"and {out / 'test.npz'} ({len(y_test)} examples)",
        highlight=False,
    )


def _examples(path: Path) -> int:
    """Examples in a shard file (closed before returning, so no ResourceWarning)."""
    with np.load(path) as shard:
        return int(shard["y"].size)
