"""The staging area: where a model payload is assembled from chunks, crash-safely.

One transfer lives in ``<data_dir>/staging/<transfer_id>/``::

    deploy.json    the deploy command's fields (deployment id, sizes), written
                   atomically when the transfer starts
    manifest.fsm   the signed manifest, as received
    payload.part   the payload, preallocated to its full length; chunks are written
                   in place at their offsets
    journal        one 36-byte record per chunk written: u32 index + the chunk's
                   sha256, appended *after* the chunk's bytes

Workflow: :meth:`StagedTransfer.create` when a deploy is accepted;
:meth:`StagedTransfer.write` for every chunk (idempotent); :meth:`missing` for what
to ask for; when :attr:`complete`, :meth:`payload_path` goes through the final
length + sha256 check and is moved into a model slot; :meth:`discard` removes it.

Crash safety: after a SIGKILL (or power cut), :meth:`StagedTransfer.open` replays
the journal and re-hashes each recorded chunk's bytes in ``payload.part``; only the
chunks whose bytes still match their recorded sha256 count as held. A torn journal
record, a chunk written but not journaled, or bytes lost from the page cache are
therefore simply downloaded again: a resumed transfer can never assemble a payload
from bytes that were not verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from compress.fileio import atomic_write
from compress.signing import MAX_BLOB_BYTES
from edge_agent.errors import StateError, TransferError
from edge_agent.ota.records import record_from_json, record_to_json, write_state_file
from edge_agent.protocol import Chunk, chunk_count

__all__ = ["StagedTransfer", "TransferInfo", "list_transfers"]

logger = logging.getLogger(__name__)

_RECORD = struct.Struct(">I32s")
_DEPLOY_FILE = "deploy.json"
_MANIFEST_FILE = "manifest.fsm"
_PAYLOAD_FILE = "payload.part"
_JOURNAL_FILE = "journal"
_MAX_DEPLOY_JSON = 4096
_READ_BLOCK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TransferInfo:
    """What a transfer is: the deploy command's fields.

    Attributes:
        deployment_id: The deployment it belongs to.
        transfer_id: sha256 of the payload (also the directory name).
        total_size: Payload length.
        chunk_size: Bytes per chunk.
        chunk_count: Number of chunks.
    """

    deployment_id: str
    transfer_id: str
    total_size: int
    chunk_size: int
    chunk_count: int

    def to_json(self) -> bytes:
        """Serialized form (deploy.json)."""
        return json.dumps(record_to_json(self), sort_keys=True).encode()

    @classmethod
    def read(cls, directory: Path) -> TransferInfo | None:
        """The deploy.json of a staging directory, or None when unreadable."""
        try:
            return _read_info(directory)
        except (OSError, StateError):
            return None

    @classmethod
    def from_json(cls, data: bytes) -> TransferInfo:
        """Parse deploy.json.

        Raises:
            StateError: not the expected JSON object, or inconsistent sizes.
        """
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise StateError(f"unreadable {_DEPLOY_FILE}: {exc}") from exc
        info = record_from_json(cls, obj, f"unreadable {_DEPLOY_FILE}")
        if (
            info.chunk_size < 1
            or info.total_size < 0
            or info.chunk_count != chunk_count(info.total_size, info.chunk_size)
        ):
            raise StateError(f"inconsistent {_DEPLOY_FILE}: {obj}")
        return info


def _read_info(directory: Path) -> TransferInfo:
    return TransferInfo.from_json((directory / _DEPLOY_FILE).read_bytes()[:_MAX_DEPLOY_JSON])


class StagedTransfer:
    """A payload being assembled from chunks in a staging directory.

    Not thread-safe: the agent drives it from its one worker thread.
    """

    def __init__(self, directory: Path, info: TransferInfo, manifest_blob: bytes) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self.directory = directory
        self.info = info
        self.manifest_blob = manifest_blob
        self._held: set[int] = set()
        self._journal = (directory / _JOURNAL_FILE).open("ab")
        try:
            self._payload_fd = os.open(directory / _PAYLOAD_FILE, os.O_RDWR)
        except OSError:
            self._journal.close()
            raise

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, root: Path, info: TransferInfo, manifest_blob: bytes) -> StagedTransfer:
        """Start a new transfer (an existing one with the same id is replaced).

        Raises:
            StateError: the staging area cannot be written (disk full, permissions).
        """
        directory = root / info.transfer_id
        try:
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True, mode=0o700)
            atomic_write(directory / _MANIFEST_FILE, manifest_blob, mode=0o600)
            with (directory / _PAYLOAD_FILE).open("wb") as payload:
                payload.truncate(info.total_size)  # sparse: no disk used until written
            (directory / _JOURNAL_FILE).touch()
            # deploy.json last: a directory without it is an unfinished creation.
            atomic_write(directory / _DEPLOY_FILE, info.to_json(), mode=0o600)
            transfer = cls(directory, info, manifest_blob)
        except OSError as exc:
            raise StateError(f"cannot create staging area {directory}: {exc}") from exc
        logger.info(
            "staging %s: %d bytes in %d chunks",
            info.transfer_id[:12],
            info.total_size,
            info.chunk_count,
        )
        return transfer

    @classmethod
    def open(cls, directory: Path) -> StagedTransfer:
        """Reopen a transfer after a restart, keeping only chunks that still verify.

        Raises:
            StateError: the directory is incomplete or its files are unreadable.
        """
        try:
            info = _read_info(directory)
            manifest_blob = (directory / _MANIFEST_FILE).read_bytes()[: MAX_BLOB_BYTES + 1]
            if len(manifest_blob) > MAX_BLOB_BYTES:
                raise StateError(f"{directory / _MANIFEST_FILE} is too large")
            payload = directory / _PAYLOAD_FILE
            if not payload.is_file() or payload.stat().st_size != info.total_size:
                raise StateError(f"{payload} is missing or has the wrong size")
            journal = (directory / _JOURNAL_FILE).read_bytes()
            transfer = cls(directory, info, manifest_blob)
        except OSError as exc:
            raise StateError(f"cannot reopen staging area {directory}: {exc}") from exc
        try:
            transfer._replay(journal)
        except OSError as exc:  # e.g. EIO from a failing SD card
            transfer.close()
            raise StateError(f"cannot read staging area {directory}: {exc}") from exc
        return transfer

    @classmethod
    def open_or_discard(cls, directory: Path) -> StagedTransfer | None:
        """:meth:`open`, or delete the directory (logged) when it cannot be reopened."""
        try:
            return cls.open(directory)
        except StateError as exc:
            logger.warning("discarding staging area %s: %s", directory, exc)
            shutil.rmtree(directory, ignore_errors=True)
            return None

    def relabel(self, deployment_id: str) -> None:
        """Record that a newer deploy command (same payload) now owns this transfer.

        Raises:
            StateError: deploy.json cannot be rewritten.
        """
        info = replace(self.info, deployment_id=deployment_id)
        write_state_file(self.directory / _DEPLOY_FILE, info.to_json(), verb="update")
        self.info = info

    def _replay(self, journal: bytes) -> None:
        usable = len(journal) - len(journal) % _RECORD.size
        if usable != len(journal):
            # Cut a torn last record, or every record appended after it would be
            # misaligned and lost on the next replay.
            try:
                self._journal.truncate(usable)
            except OSError as exc:
                self.close()
                raise StateError(f"cannot repair {self.directory / _JOURNAL_FILE}: {exc}") from exc
        dropped = 0
        for offset in range(0, usable, _RECORD.size):
            index, digest = _RECORD.unpack_from(journal, offset)
            if index >= self.info.chunk_count or index in self._held:
                continue
            if hashlib.sha256(self._read_chunk(index)).digest() == digest:
                self._held.add(index)
            else:
                dropped += 1
        logger.info(
            "resumed staging %s: %d of %d chunks verified, %d dropped",
            self.info.transfer_id[:12],
            len(self._held),
            self.info.chunk_count,
            dropped,
        )

    def close(self) -> None:
        """Close the files (idempotent); the staging directory stays."""
        if not self._journal.closed:
            self._journal.close()
        if self._payload_fd >= 0:
            os.close(self._payload_fd)
            self._payload_fd = -1

    def discard(self) -> None:
        """Close and delete the staging directory."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ chunks

    @property
    def held(self) -> int:
        """Number of chunks held and verified."""
        return len(self._held)

    @property
    def complete(self) -> bool:
        """Whether every chunk is held."""
        return len(self._held) == self.info.chunk_count

    def has(self, index: int) -> bool:
        """Whether chunk ``index`` is held."""
        return index in self._held

    def missing(self, limit: int) -> list[int]:
        """Up to ``limit`` missing chunk indices, lowest first."""
        out: list[int] = []
        for index in range(self.info.chunk_count):
            if index not in self._held:
                out.append(index)
                if len(out) >= limit:
                    break
        return out

    def matches(self, chunk: Chunk) -> bool:
        """Whether a (decoded, self-consistent) chunk belongs to this transfer."""
        info = self.info
        return (
            chunk.transfer_id == info.transfer_id
            and chunk.total_size == info.total_size
            and chunk.chunk_size == info.chunk_size
        )

    def write(self, chunk: Chunk) -> bool:
        """Store a chunk; return True if it was new.

        The chunk must come from :func:`edge_agent.protocol.decode` (which checked
        its geometry and sha256) and :meth:`matches` this transfer.

        Raises:
            TransferError: the chunk belongs to another transfer.
            StateError: the disk write failed.
        """
        if not self.matches(chunk):
            raise TransferError(f"chunk of transfer {chunk.transfer_id[:12]} does not belong here")
        if chunk.index in self._held:
            return False
        try:
            written = os.pwrite(self._payload_fd, chunk.data, chunk.offset)
            if written != len(chunk.data):
                raise OSError(f"short write ({written} of {len(chunk.data)} bytes)")
            self._journal.write(_RECORD.pack(chunk.index, bytes.fromhex(chunk.sha256)))
            self._journal.flush()
        except OSError as exc:
            raise StateError(
                f"cannot write chunk {chunk.index} to {self.directory}: {exc}"
            ) from exc
        self._held.add(chunk.index)
        return True

    def _read_chunk(self, index: int) -> bytes:
        offset = index * self.info.chunk_size
        size = min(self.info.chunk_size, self.info.total_size - offset)
        return os.pread(self._payload_fd, size, offset)

    # ---------------------------------------------------------------- payload

    def payload_path(self) -> Path:
        """The assembled payload file (meaningful once :attr:`complete`)."""
        return self.directory / _PAYLOAD_FILE

    def sync(self) -> None:
        """Flush the payload to disk before it is moved into a slot.

        Raises:
            StateError: fsync failed.
        """
        try:
            os.fsync(self._payload_fd)
        except OSError as exc:
            raise StateError(f"cannot flush {self.payload_path()}: {exc}") from exc


def list_transfers(root: Path) -> list[Path]:
    """Staging directories under ``root`` (oldest first); unfinished creations removed."""
    if not root.is_dir():
        return []
    found: list[Path] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
        if not entry.is_dir():
            continue
        if not (entry / _DEPLOY_FILE).is_file():
            logger.info("removing unfinished staging directory %s", entry)
            with contextlib.suppress(OSError):
                shutil.rmtree(entry)
            continue
        found.append(entry)
    return found
