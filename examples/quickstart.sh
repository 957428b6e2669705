#!/usr/bin/env bash
# The quickstart: train a digits MLP, export it to ONNX, quantize it to int8, sign it
# into one artifact, and verify it the way a device would. Run from the repository
# root after `pip install -e '.[all]'`. Output goes to out/quickstart/ (or $1).
set -euo pipefail
out="${1:-out/quickstart}"

python examples/train_digits.py --out "$out"
fedge keys generate --out "$out/keys" --force
fedge model export --family mlp --weights "$out/weights.npz" --out "$out/digits.onnx"
fedge model package "$out/digits.onnx" --name digits --version 1 \
    --key "$out/keys/signing.key" --quantize int8 \
    --eval "$out/test.npz" --out "$out/digits-v1.fedge"
fedge model inspect "$out/digits-v1.fedge" --trust "$out/keys/signing.pub"
fedge-agent verify "$out/digits-v1.fedge" --trust "$out/keys/signing.pub"
