"""Benchmark: the agent's crash-safe log (SQLite) against the two file formats it replaced.

The telemetry spool and the feedback buffer used to keep their records in files of
their own: one file per item written with ``atomic_write`` (temporary file, fsync,
rename, directory fsync; a pop unlinks it), and one append-only file of CRC-framed
records (one ``write`` + ``fsync`` per append; the head is dropped by compaction,
so it has no pop). Both now use :class:`edge_agent.durable_log.DurableLog`: one
SQLite table, WAL journal, ``synchronous=FULL`` (durable at every change, as the
files were) or ``NORMAL`` (survives a killed process, not a power cut). The two
file formats are reproduced here at their core, for the side-by-side figures:

* **append**: items per second, each durable before the call returns;
* **pop**: items per second taken off the head;
* **size**: bytes on disk for the items held (SQLite: after its checkpoint);
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
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from _support import argument_parser, environment, write_json

from compress.fileio import atomic_write
from edge_agent.durable_log import DurableLog

DEFAULT_OUT = Path(__file__).parent / "results" / "durable_log.json"


class Store(Protocol):
    def append(self, data: bytes) -> int: ...
    def items(self) -> list[bytes]: ...
    def close(self) -> None: ...


@runtime_checkable
class Popping(Store, Protocol):
    """A store whose head is taken off one item at a time (the old feedback file had
    no such call: compaction dropped its head, so it has no pop to measure)."""

    def pop(self) -> bytes | None: ...


_HEADER = struct.Struct(">4sII")  # magic, length, CRC-32: the old framing


class FilePerItem:
    """The old spool: a file per item, written atomically; a pop unlinks it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.seqs = sorted(int(p.stem) for p in directory.glob("*.item"))

    def append(self, data: bytes) -> int:
        seq = self.seqs[-1] + 1 if self.seqs else 1
        framed = _HEADER.pack(b"FSP1", len(data), zlib.crc32(data)) + data
        atomic_write(self.dir / f"{seq:020d}.item", framed, mode=0o600)
        self.seqs.append(seq)
        return seq

    def pop(self) -> bytes | None:
        if not self.seqs:
            return None
        path = self.dir / f"{self.seqs.pop(0):020d}.item"
        data = path.read_bytes()[_HEADER.size :]
        path.unlink()
        return data

    def items(self) -> list[bytes]:
        return [(self.dir / f"{s:020d}.item").read_bytes()[_HEADER.size :] for s in self.seqs]

    def close(self) -> None:
        return None


class AppendLog:
    """The old feedback buffer: CRC-framed records appended to one file, fsync each."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "records.log"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, data: bytes) -> int:
        os.write(self.fd, _HEADER.pack(b"FBK1", len(data), zlib.crc32(data)) + data)
        os.fsync(self.fd)
        return 0

    def items(self) -> list[bytes]:
        blob, pos, out = self.path.read_bytes(), 0, []
        while pos + _HEADER.size <= len(blob):
            magic, length, crc = _HEADER.unpack_from(blob, pos)
            data = blob[pos + _HEADER.size : pos + _HEADER.size + length]
            if magic != b"FBK1" or len(data) != length or zlib.crc32(data) != crc:
                break  # a torn tail: the recovery of the old format skipped it
            out.append(data)
            pos += _HEADER.size + length
        return out

    def close(self) -> None:
        os.close(self.fd)


class SqliteLog:
    """The agent's DurableLog."""

    def __init__(self, directory: Path, durable: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.log = DurableLog(directory / "log.db", durable=durable)

    def append(self, data: bytes) -> int:
        return self.log.change(append=[data])[0]

    def pop(self) -> bytes | None:
        head = self.log.records(1)
        if not head:
            return None
        self.log.change(delete=[head[0][0]])
        return head[0][1]

    def items(self) -> list[bytes]:
        return [data for _, data in self.log.records()]

    def close(self) -> None:
        self.log.close()


KINDS: dict[str, Callable[[Path], Store]] = {
    "file per item (old spool)": FilePerItem,
    "append-only file (old feedback)": AppendLog,
    "DurableLog sqlite FULL": lambda d: SqliteLog(d, durable=True),
    "DurableLog sqlite NORMAL": lambda d: SqliteLog(d, durable=False),
}


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def apparent_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def measure(kind: str, root: Path, items: int, item_bytes: int) -> dict[str, Any]:
    directory = root / f"m-{abs(hash(kind))}"
    store = KINDS[kind](directory)
    payloads = [random.randbytes(item_bytes) for _ in range(items)]
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
    pop_rate: float | None = None
    if isinstance(store, Popping):
        start = time.perf_counter()
        for _ in range(items):
            store.pop()
        pop_rate = items / (time.perf_counter() - start)
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
            "sqlite": sqlite3.sqlite_version,
            "environment": environment([]),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
