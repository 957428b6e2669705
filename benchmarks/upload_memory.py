"""Benchmark: coordinator memory for devices' chunked uploads, in memory against on disk.

Until issue 17 an upload in flight was a buffer of its declared size in the
coordinator's memory, so ``--devices`` uploads of ``--size-mib`` held their sum in
RAM until their reports came. Now :class:`coordinator.federated.uploads.UploadReceiver`
writes chunks into a spool file per upload and keeps an index of one byte per chunk.

Each mode runs in a fresh child process: it builds one payload (every device
sends the same bytes; the receiver keys uploads by device), reads its ``VmRSS``,
receives every device's chunks (``--chunk-kib``, the agent's 64 KiB by default)
with all uploads in flight at once, then takes each upload (hash check; the
on-disk mode memory-maps the file) and reads ``VmHWM``. The figure is the peak
growth over the payload: what the uploads cost.

* **memory**: the previous design reproduced at its core: a ``bytearray`` of the
  declared size per upload, chunks copied in;
* **spool**: the receiver as it is, spooling to a temporary directory.

Prints a table and writes JSON::

    python benchmarks/upload_memory.py --devices 8 --size-mib 16 \\
        --out benchmarks/results/upload_memory.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _support import argument_parser, environment, proc_memory_kib, write_json

from coordinator.federated.uploads import UploadReceiver
from edge_agent.protocol import Chunk, chunk_count, sha256_hex

DEFAULT_OUT = Path(__file__).parent / "results" / "upload_memory.json"
MODES = ("memory", "spool")


def _chunks(payload: bytes, chunk_size: int, transfer_id: str) -> Any:
    for index in range(chunk_count(len(payload), chunk_size)):
        yield Chunk.from_payload(payload, index, chunk_size=chunk_size, transfer_id=transfer_id)


def child(mode: str, devices: int, size: int, chunk_size: int) -> dict[str, Any]:
    """One mode's run, in this process; its figures."""
    payload = bytes(range(256)) * (size // 256)
    transfer_id = sha256_hex(payload)
    before = proc_memory_kib()["VmRSS"]
    start = time.perf_counter()
    taken = 0
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as spool:
        if mode == "memory":
            buffers = {f"dev{d}": bytearray(len(payload)) for d in range(devices)}
            for buffer in buffers.values():
                for chunk in _chunks(payload, chunk_size, transfer_id):
                    buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
            for buffer in buffers.values():
                taken += sha256_hex(buffer) == transfer_id
        else:
            receiver = UploadReceiver(budget_bytes=2 * size, spool_dir=Path(spool) / "uploads")
            for d in range(devices):
                for chunk in _chunks(payload, chunk_size, transfer_id):
                    receiver.receive(f"dev{d}", chunk, limit=size)
            for d in range(devices):
                taken += len(receiver.take(f"dev{d}", transfer_id)) == size
            receiver.close()
    seconds = time.perf_counter() - start
    peak = proc_memory_kib()["VmHWM"]
    return {
        "mode": mode,
        "uploads_ok": taken,
        "declared_mib": devices * size / 2**20,
        "peak_growth_mib": round((peak - before) / 1024, 1),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=16)
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument(
        "--child", choices=MODES, help="internal: run one mode here, print its figures as JSON"
    )
    args = parser.parse_args()
    size, chunk_size = args.size_mib * 2**20, args.chunk_kib * 1024
    if args.child:
        print(json.dumps(child(args.child, args.devices, size, chunk_size)))
        return
    rows = []
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--devices", str(args.devices),
             "--size-mib", str(args.size_mib), "--chunk-kib", str(args.chunk_kib)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout))
    print(f"{args.devices} uploads of {args.size_mib} MiB in flight, {args.chunk_kib} KiB chunks")
    print(f"{'mode':8} {'declared MiB':>13} {'peak RSS growth MiB':>20} {'seconds':>8}")
    for row in rows:
        print(f"{row['mode']:8} {row['declared_mib']:>13.0f} {row['peak_growth_mib']:>20} "
              f"{row['seconds']:>8}")  # fmt: skip
    settings = {"devices": args.devices, "size_mib": args.size_mib, "chunk_kib": args.chunk_kib}
    write_json(args.out, {"settings": settings, "results": rows, "environment": environment([])})


if __name__ == "__main__":
    main()
