#!/usr/bin/env bash
# Over-the-air delivery on one machine: a mosquitto broker with fedge's ACL, two
# device agents, and the operator's CLI. Run from the repository root after
# `pip install -e '.[all]'` with mosquitto installed (it is started here, on a free
# loopback port; nothing is left running). Output goes to out/ota-demo/ (or $1).
#
#   1. train and package digits v1 and v2 (signed, int8), as examples/quickstart.sh
#   2. start mosquitto (least-privilege ACL from `fedge broker acl`, one password
#      per device and one for the coordinator)
#   3. start two agents with a local inference endpoint each
#   4. fedge devices; fedge deploy v1 --wait; a prediction over HTTP
#   5. fedge deploy v2 to one device; fedge rollback of that device; fedge devices
set -euo pipefail
out="${1:-out/ota-demo}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# shellcheck source=examples/broker.sh
. "$(dirname "$0")/broker.sh"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== 1. models"
python examples/train_digits.py --out "$out"
fedge keys generate --out "$out/keys" --force
fedge model export --family mlp --weights "$out/weights.npz" --out "$out/digits.onnx"
for version in 1 2; do
    fedge model package "$out/digits.onnx" --name digits --version "$version" \
        --key "$out/keys/signing.key" --quantize int8 --out "$out/digits-v$version.fedge"
done

echo "== 2. broker"
start_broker coordinator pi-1 pi-2

echo "== 3. agents"
http_ports=()
for device in pi-1 pi-2; do
    http_port="$(free_port)"
    http_ports+=("$http_port")
    fedge-agent run --device-id "$device" --broker "$FEDGE_BROKER" \
        --password-file "$out/$device.password" --trust "$out/keys/signing.pub" \
        --data-dir "$out/$device" --http "127.0.0.1:$http_port" --tag demo \
        > "$out/$device.log" 2>&1 &
    pids+=($!)
done
for _ in $(seq 100); do  # wait until both announced themselves
    online="$(fedge devices --json | python -c 'import json,sys; print(sum(d["online"] for d in json.load(sys.stdin)["devices"]))')"
    [ "$online" = 2 ] && break
    sleep 0.2
done
fedge devices

echo "== 4. deploy v1 to every device"
fedge deploy "$out/digits-v1.fedge" --to all --wait --timeout 60 --trust "$out/keys/signing.pub"
row="$(python -c 'import numpy as np; print(np.load("'"$out"'/test.npz")["x"][0].tolist())')"
curl -s -X POST "http://127.0.0.1:${http_ports[0]}/v1/predict" \
    -H 'Content-Type: application/json' -d "{\"inputs\": [$row]}"
echo

echo "== 5. v2 to pi-1, then roll pi-1 back"
fedge deploy "$out/digits-v2.fedge" --to device:pi-1 --wait --timeout 60 \
    --trust "$out/keys/signing.pub"
fedge rollback --to device:pi-1 --model digits
fedge devices
curl -s "http://127.0.0.1:${http_ports[0]}/v1/model"
echo
