#!/usr/bin/env bash
# Federated learning on one machine: a mosquitto broker with fedge's ACL, five
# device agents each holding a Dirichlet(0.5) shard of the digits dataset, and the
# operator's CLI. Run from the repository root after `pip install -e '.[all]'` with
# mosquitto installed (it is started here, on a free loopback port; nothing is left
# running). Output goes to out/federated-demo/ (or $1).
#
#   1. fedge data digits: five shards and a held-out test set
#   2. start mosquitto (least-privilege ACL, one password per device)
#   3. start five agents: fedge-agent run --train-data shardN --http ...
#   4. fedge train: 15 rounds of FedAvg, top-k 5 % + int8 updates, evaluated on the
#      test set, packaged as a signed int8 artifact
#   5. fedge deploy the trained model to every device; a prediction over HTTP
set -euo pipefail
out="${1:-out/federated-demo}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
devices=(pi-0 pi-1 pi-2 pi-3 pi-4)
# shellcheck source=examples/broker.sh
. "$(dirname "$0")/broker.sh"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== 1. data"
fedge data digits --clients "${#devices[@]}" --alpha 0.5 --out "$out/data"
fedge keys generate --out "$out/keys" --force

echo "== 2. broker"
start_broker coordinator "${devices[@]}"

echo "== 3. agents"
http_port="$(free_port)"
for i in "${!devices[@]}"; do
    device="${devices[$i]}"
    http=()
    [ "$i" = 0 ] && http=(--http "127.0.0.1:$http_port")
    fedge-agent run --device-id "$device" --broker "$FEDGE_BROKER" \
        --password-file "$out/$device.password" --trust "$out/keys/signing.pub" \
        --data-dir "$out/state/$device" --train-data "$out/data/shard$i" "${http[@]}" \
        > "$out/$device.log" 2>&1 &
    pids+=($!)
done
for _ in $(seq 100); do  # wait until every device announced its data
    ready="$(fedge devices --json | python -c 'import json,sys; print(sum(d["online"] and d["train_examples"] > 0 for d in json.load(sys.stdin)["devices"]))')"
    [ "$ready" = "${#devices[@]}" ] && break
    sleep 0.2
done
fedge devices

echo "== 4. federated training"
fedge train --model digits --family mlp --hidden 128 --rounds 15 \
    --clients-per-round "${#devices[@]}" --min-clients 4 --round-timeout 30 \
    --strategy fedavg --codec topk:0.05+int8 --epochs 2 --batch-size 16 \
    --eval-data "$out/data/test.npz" --out "$out/weights.npz" \
    --package "$out/digits-v1.fedge" --key "$out/keys/signing.key" --json > "$out/train.json"
python -c 'import json,sys; r=json.load(open(sys.argv[1])); print("final accuracy", r["final_accuracy"], "rounds ok", r["rounds_ok"])' "$out/train.json"

echo "== 5. deploy the trained model"
fedge deploy "$out/digits-v1.fedge" --to all --wait --timeout 60 --trust "$out/keys/signing.pub"
row="$(python -c 'import numpy as np; print(np.load("'"$out"'/data/test.npz")["x"][0].tolist())')"
curl -s -X POST "http://127.0.0.1:$http_port/v1/predict" \
    -H 'Content-Type: application/json' -d "{\"inputs\": [$row]}"
echo
