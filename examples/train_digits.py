"""Train the reference digits MLP and write what the quickstart packages.

Writes into ``--out`` (default ``out/quickstart``):

* ``weights.npz``: an MLP 64-512-512-10 in fedge's built-in ``mlp`` layout;
* ``test.npz``: held-out ``x`` and ``y`` for ``fedge model package --eval``;
* ``calibration.npz``: 200 training rows ``x`` for static int8 quantization.

Deterministic for a given ``--seed``. Uses scikit-learn's bundled digits data set (no
download).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from coordinator.sim.datasets import load_digits_split, train_reference_mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    weights = train_reference_mlp(x_train, y_train, hidden=(512, 512), seed=args.seed)
    np.savez(args.out / "weights.npz", **weights)
    np.savez(args.out / "test.npz", x=x_test, y=y_test)
    np.savez(args.out / "calibration.npz", x=x_train[:200])
    print(f"wrote weights.npz, test.npz, calibration.npz to {args.out}")


if __name__ == "__main__":
    main()
