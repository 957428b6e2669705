"""Benchmark: the agent's crash-safe stores side by side, files against stdlib sqlite3.

The agent keeps two bounded, crash-safe queues on disk: the telemetry spool
(:class:`edge_agent.spool.Spool`: one file per item, each written with
``atomic_write``, i.e. temporary file, fsync, rename, directory fsync) and the
feedback buffer (:class:`edge_agent.training.feedback.FeedbackBuffer`: one
append-only file of CRC-framed records, fsync per append, compacted when a quarter
over its bounds). This script measures them against one SQLite table (``sqlite3``,
WAL journal; ``synchronous=FULL``, durable at every commit, and ``NORMAL``, durable
at checkpoints only), with the same items:

* **append**: items per second, each durable before the call returns;
* **pop**: items per second taken off the head (spool: ``peek`` + ``remove``;
  sqlite: ``SELECT`` + ``DELETE``; the feedback log has no pop: its head is dropped
  by the bounds and compacted, which the steady-state append figure includes);
* **size**: bytes on disk for the items held;
* **crash**: a child process appends as fast as it can and prints each sequence
  number once the call returned; it is SIGKILLed at a random moment, the store is
  reopened, and every acknowledged item must be there, intact (``--crashes`` runs).

Prints a table and writes JSON::

    python benchmarks/durable_log.py --items 2000 --item-bytes 1024 \\
        --out benchmarks/results/durable_log.json
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from _support import argument_parser, environment, write_json

from edge_agent.spool import Spool
from edge_agent.training.feedback import FeedbackBuffer

DEFAULT_OUT = Path(__file__).parent / "results" / "durable_log.json"
BIG = 1 << 40


class Store(Protocol):
    def append(self, data: bytes) -> int: ...
    def pop(self) -> bytes | None: ...
    def items(self) -> list[bytes]: ...
    def close(self) -> None: ...


class SpoolStore:
    """The telemetry spool: a file per item."""

    def __init__(self, directory: Path, fsync: bool = True) -> None:
        del fsync
        self.spool = Spool(directory, max_bytes=BIG, max_items=10**9)

    def append(self, data: bytes) -> int:
        return self.spool.append(data)

    def pop(self) -> bytes | None:
        items = self.spool.peek(1)
        if not items:
            return None
        self.spool.remove(items[0].seq)
        return items[0].data

    def items(self) -> list[bytes]:
        return [item.data for item in self.spool.peek(10**9)]

    def close(self) -> None:
        return None


class FeedbackStore:
    """The feedback buffer's append-only record file (items as float32 rows)."""

    def __init__(self, directory: Path, fsync: bool = True, max_examples: int = 10**6) -> None:
        self.buffer = FeedbackBuffer(
            directory, max_examples=max_examples, max_bytes=1 << 28, fsync=fsync
        )

    def append(self, data: bytes) -> int:
        self.buffer.add(np.frombuffer(data, dtype=np.float32), 1)
        return len(self.buffer)

    def pop(self) -> bytes | None:
        raise NotImplementedError("the feedback log drops its head by its bounds")

    def items(self) -> list[bytes]:
        data = self.buffer.dataset()
        return [] if data is None else [row.astype("<f4").tobytes() for row in data.x]

    def close(self) -> None:
        return None


class SqliteStore:
    """One table, WAL journal."""

    def __init__(self, directory: Path, synchronous: str = "FULL") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(directory / "log.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("CREATE TABLE IF NOT EXISTS items (seq INTEGER PRIMARY KEY, data BLOB)")

    def append(self, data: bytes) -> int:
        cursor = self.db.execute("INSERT INTO items (data) VALUES (?)", (data,))
        return int(cursor.lastrowid or 0)

    def pop(self) -> bytes | None:
        row = self.db.execute("SELECT seq, data FROM items ORDER BY seq LIMIT 1").fetchone()
        if row is None:
            return None
        self.db.execute("DELETE FROM items WHERE seq = ?", (row[0],))
        return bytes(row[1])

    def items(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.db.execute("SELECT data FROM items ORDER BY seq")]

    def close(self) -> None:
        self.db.close()


KINDS: dict[str, Callable[[Path], Store]] = {
    "file spool (file per item)": SpoolStore,
    "file log (feedback records)": FeedbackStore,
    "sqlite WAL synchronous=FULL": lambda d: SqliteStore(d, "FULL"),
    "sqlite WAL synchronous=NORMAL": lambda d: SqliteStore(d, "NORMAL"),
}


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def apparent_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def measure(kind: str, root: Path, items: int, item_bytes: int) -> dict[str, Any]:
    directory = root / f"m-{abs(hash(kind))}"
    store = KINDS[kind](directory)
    rng = np.random.default_rng(1)  # finite float32 values: the feedback log takes rows
    payloads = [rng.random(item_bytes // 4, dtype=np.float32).tobytes() for _ in range(items)]
    start = time.perf_counter()
    for payload in payloads:
        store.append(payload)
    append_s = time.perf_counter() - start
    store.close()  # sqlite: checkpoints the WAL into the database file
    size = {"apparent": apparent_bytes(directory), "allocated": disk_bytes(directory)}
    reopen_start = time.perf_counter()
    store = KINDS[kind](directory)
    held = store.items()
    reopen_s = time.perf_counter() - reopen_start
    assert held == payloads, f"{kind}: items changed across reopen"
    pop_rate: float | None
    try:
        start = time.perf_counter()
        for _ in range(items):
            store.pop()
        pop_rate = items / (time.perf_counter() - start)
    except NotImplementedError:
        pop_rate = None
    store.close()
    return {
        "append_per_s": items / append_s,
        "pop_per_s": pop_rate,
        "reopen_s": reopen_s,
        "bytes_apparent": size["apparent"],
        "bytes_allocated": size["allocated"],
        "overhead_per_item": (size["apparent"] - items * item_bytes) / items,
    }


def crash_child(kind: str, directory: str, item_bytes: int) -> None:
    """Append numbered items forever; print each number once it is durable."""
    store = KINDS[kind](Path(directory))
    i = 0
    while True:
        payload = i.to_bytes(8, "big") * (item_bytes // 8)
        store.append(payload)
        sys.stdout.write(f"{i}\n")
        sys.stdout.flush()
        i += 1


def crash_runs(kind: str, root: Path, runs: int, item_bytes: int) -> dict[str, Any]:
    lost = damaged = 0
    acked_total = 0
    for run in range(runs):
        directory = root / f"c-{abs(hash(kind))}-{run}"
        child = subprocess.Popen(
            [sys.executable, __file__, "--crash-child", kind, str(directory), str(item_bytes)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(random.uniform(0.3, 0.8))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        acked = [int(line) for line in out.split()]
        acked_total += len(acked)
        store = KINDS[kind](directory)
        held = store.items()
        store.close()
        numbers = []
        for data in held:
            value = int.from_bytes(data[:8], "big")
            if data != value.to_bytes(8, "big") * (item_bytes // 8):
                damaged += 1
            numbers.append(value)
        lost += len(set(acked) - set(numbers))
    return {"runs": runs, "acknowledged": acked_total, "lost": lost, "damaged": damaged}


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--crash-child"]:
        crash_child(args_in[1], args_in[2], int(args_in[3]))
        return 0
    parser = argument_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--item-bytes", type=int, default=1024)
    parser.add_argument("--crashes", type=int, default=5)
    args = parser.parse_args(args_in)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # a real disk, not tmpfs
        root = Path(tmp)
        for kind in KINDS:
            results[kind] = measure(kind, root, args.items, args.item_bytes)
            results[kind]["crash"] = crash_runs(kind, root, args.crashes, args.item_bytes)
    header = (
        f"{'store':32} {'append/s':>9} {'pop/s':>9} {'reopen s':>9} "
        f"{'bytes/item':>10} {'alloc MiB':>9} {'crash lost/acked':>17}"
    )
    print(f"{args.items} items of {args.item_bytes} bytes; {args.crashes} SIGKILLs each")
    print(header)
    for kind, r in results.items():
        pop = "-" if r["pop_per_s"] is None else f"{r['pop_per_s']:.0f}"
        crash = r["crash"]
        print(
            f"{kind:32} {r['append_per_s']:9.0f} {pop:>9} {r['reopen_s']:9.3f} "
            f"{args.item_bytes + r['overhead_per_item']:10.0f} "
            f"{r['bytes_allocated'] / 2**20:9.2f} "
            f"{crash['lost'] + crash['damaged']:>7}/{crash['acknowledged']:<9}"
        )
    write_json(
        args.out,
        {
            "items": args.items,
            "item_bytes": args.item_bytes,
            "results": results,
            "environment": environment(["numpy"]),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
