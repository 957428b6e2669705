"""Chunked uploads stream to disk: memory per upload is its index, files are cleaned up.

The attack (issue 17, "Service defaults: uploads stream to disk"): every upload in
flight was a buffer of its declared size in the coordinator's memory, so devices
within their budgets could still make it hold (devices x budget) bytes of RAM.
Now chunks are written into a file per upload in a private spool directory
(:mod:`coordinator.federated.spool`); memory holds one byte per chunk. Files go
when an upload completes, is refused or abandoned, and a crashed process's files
when the next spool opens. A full disk or an unusable directory is a typed,
logged refusal (:class:`~coordinator.errors.UploadSpoolError`), and uploads go
on working afterwards.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from compress.codecs import parse_codec
from coordinator.errors import UpdateRejectedError, UploadRefusedError, UploadSpoolError
from coordinator.federated import spool as spool_module
from coordinator.federated.grid import MqttGrid
from coordinator.federated.spool import UploadSpool
from coordinator.federated.tasks import GridSettings
from coordinator.federated.uploads import MIN_UPLOAD_CHUNK_BYTES, Upload, UploadReceiver
from coordinator.link.memory import MemoryHub
from coordinator.service.config import ServiceConfig, TrustConfig
from edge_agent.protocol import Chunk, Status, sha256_hex
from tests.test_uploads import _report, _train_task, _update_body, chunks_of, payload_of

LIMIT = 8 << 20


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[UploadReceiver]:
    uploads = UploadReceiver(spool_dir=tmp_path / "spool")
    try:
        yield uploads
    finally:
        uploads.close()


def sessions(root: Path) -> list[Path]:
    return sorted(root.glob("session-*"))


# ------------------------------------------------------------------ memory


def test_an_upload_in_flight_holds_only_its_index_in_memory(receiver: UploadReceiver) -> None:
    payload = payload_of(4 << 20)
    chunks = chunks_of(payload, MIN_UPLOAD_CHUNK_BYTES)
    tracemalloc.start()
    try:
        for chunk in chunks[:-1]:
            receiver.receive("dev1", chunk, limit=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The receiver holds the index: one byte per chunk, not the 4 MiB received.
    assert receiver.memory_bytes() == len(chunks) == 1024
    [upload] = receiver._uploads.values()
    for field in dataclasses.fields(Upload):
        value = getattr(upload, field.name)
        if isinstance(value, bytes | bytearray | memoryview):
            assert len(value) <= len(chunks), field.name
    # What Python allocated while 4 MiB went through is a few chunks, not the upload.
    assert peak < 256 * 1024
    [file] = receiver.spool.files()
    assert file.stat().st_size == len(payload)
    receiver.receive("dev1", chunks[-1], limit=LIMIT)
    assert bytes(receiver.take("dev1", sha256_hex(payload))) == payload


def test_the_spool_is_private_to_this_user(tmp_path: Path) -> None:
    uploads = UploadReceiver(spool_dir=tmp_path / "spool")
    try:
        uploads.receive("dev1", chunks_of(payload_of(9000), 4096)[0], limit=LIMIT)
        root = tmp_path / "spool"
        assert root.stat().st_mode & 0o777 == 0o700
        assert uploads.spool.directory.stat().st_mode & 0o777 == 0o700
        [file] = uploads.spool.files()
        assert file.stat().st_mode & 0o777 == 0o600
    finally:
        uploads.close()


# ----------------------------------------------------------------- cleanup


def test_files_are_removed_when_an_upload_completes(receiver: UploadReceiver) -> None:
    payload = payload_of(50_000)
    for chunk in chunks_of(payload, 4096):
        receiver.receive("dev1", chunk, limit=LIMIT)
    assert len(receiver.spool.files()) == 1
    view = receiver.take("dev1", sha256_hex(payload))
    assert receiver.spool.files() == []
    assert bytes(view) == payload  # the map outlives its deleted file


def test_files_are_removed_when_uploads_are_abandoned_refused_or_corrupt(
    receiver: UploadReceiver,
) -> None:
    # abandoned: the phase ends before the report comes
    receiver.receive("dev1", chunks_of(payload_of(20_000, 1), 4096)[0], limit=LIMIT)
    assert len(receiver.spool.files()) == 1
    receiver.clear()
    assert receiver.spool.files() == []
    # refused mid-upload: the chunk size changes
    payload = payload_of(5 * 8192, 2)
    receiver.receive("dev1", chunks_of(payload, 8192)[0], limit=LIMIT)
    with pytest.raises(UploadRefusedError, match="upload_chunk_size"):
        receiver.receive("dev1", chunks_of(payload, 4096)[3], limit=LIMIT)
    assert receiver.spool.files() == []
    # complete, but the bytes do not hash to the transfer id: rejected, file gone
    payload, claimed = payload_of(3 * 4096, 3), "f" * 64
    for index in range(3):
        chunk = Chunk.from_payload(payload, index, chunk_size=4096, transfer_id=claimed)
        receiver.receive("dev1", chunk, limit=LIMIT)
    assert len(receiver.spool.files()) == 1
    with pytest.raises(UpdateRejectedError, match="malformed: the upload is incomplete or does"):
        receiver.take("dev1", claimed)
    assert receiver.spool.files() == []


def test_closing_removes_the_spool_session(tmp_path: Path) -> None:
    uploads = UploadReceiver(spool_dir=tmp_path / "spool")
    uploads.receive("dev1", chunks_of(payload_of(20_000), 4096)[0], limit=LIMIT)
    session = uploads.spool.directory
    uploads.close()
    assert not session.exists()
    assert sessions(tmp_path / "spool") == []
    uploads.close()  # twice is fine


_CRASH = """
import os, sys
from pathlib import Path
from coordinator.federated.spool import UploadSpool
spool = UploadSpool.open(Path(sys.argv[1]))
spool.create(100_000).write(0, b"x" * 4096)
os._exit(9)  # dies without cleaning up, like kill -9
"""


def test_leftovers_of_a_crashed_process_are_removed_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "spool"
    live = UploadSpool.open(root)  # another run, still going: it must be left alone
    try:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run([sys.executable, "-c", _CRASH, str(root)], env=env, check=False)
        assert done.returncode == 9
        [crashed] = set(sessions(root)) - {live.directory}
        assert list(crashed.glob("*.part"))
        with caplog.at_level(logging.INFO, logger="coordinator.federated.spool"):
            uploads = UploadReceiver(spool_dir=root)
        assert not crashed.exists()
        assert "removed 1 leftover session" in caplog.text
        assert live.directory.exists()
        assert set(sessions(root)) == {live.directory, uploads.spool.directory}
        uploads.close()
    finally:
        live.close()


# --------------------------------------------------------- storage failures


def test_an_unusable_spool_directory_is_a_typed_logged_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with caplog.at_level(logging.ERROR), pytest.raises(UploadSpoolError, match="cannot create"):
        UploadReceiver(spool_dir=not_a_dir / "spool")
    assert "upload spool" in caplog.text
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(UploadSpoolError, match="mode 0700"):
        UploadReceiver(spool_dir=shared)
    if os.getuid() == 0:  # a directory another user planted
        planted = tmp_path / "planted"
        planted.mkdir(mode=0o700)
        os.chown(planted, 65534, 65534)
        with pytest.raises(UploadSpoolError, match="owned by uid 65534"):
            UploadReceiver(spool_dir=planted)


def test_a_full_disk_refuses_the_upload_and_the_next_one_still_works(
    receiver: UploadReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A real EFBIG from the kernel: the file size limit stands in for a full disk."""
    big, small = payload_of(256 * 1024, 1), payload_of(20_000, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        with caplog.at_level(logging.WARNING), pytest.raises(UploadRefusedError) as info:
            receiver.receive("dev1", chunks_of(big, 4096)[0], limit=LIMIT)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert info.value.reason == "upload_storage"
    assert "File too large" in str(info.value)
    assert "cannot reserve space" in caplog.text
    assert receiver.refusals == {"upload_storage": 1}
    assert receiver.spool.files() == []
    assert receiver.held_bytes() == 0
    for chunk in chunks_of(big, 4096)[1:3]:  # the rest of the refused upload: dropped
        receiver.receive("dev1", chunk, limit=LIMIT)
    with pytest.raises(UploadRefusedError, match="upload_storage"):
        receiver.take("dev1", sha256_hex(big))
    for chunk in chunks_of(small, 4096):
        receiver.receive("dev1", chunk, limit=LIMIT)
    assert bytes(receiver.take("dev1", sha256_hex(small))) == small


def test_a_write_that_fails_mid_upload_refuses_it(
    receiver: UploadReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    payload = payload_of(5 * 4096)
    first, second, *_ = chunks_of(payload, 4096)
    receiver.receive("dev1", first, limit=LIMIT)
    [file] = receiver.spool.files()
    file.unlink()
    file.mkdir()  # the file is no longer writable
    with caplog.at_level(logging.ERROR), pytest.raises(UploadRefusedError) as info:
        receiver.receive("dev1", second, limit=LIMIT)
    assert info.value.reason == "upload_storage"
    assert "cannot write" in caplog.text
    file.rmdir()
    assert receiver.held_bytes() == 0


# ------------------------------------------------------------------ wiring


def test_the_grid_spools_into_its_configured_directory_and_removes_it(tmp_path: Path) -> None:
    hub = MemoryHub()
    hub.start()
    hub.receive("dev1", Status(online=True, agent_version="1"))
    settings = GridSettings(
        model="m",
        family="softmax",
        codec=parse_codec("fp32"),
        gather_s=0.01,
        upload_dir=tmp_path / "uploads",
    )
    grid = MqttGrid(hub, settings)
    try:
        task_id, weights = _train_task(grid, 1)
        body, index = _update_body(weights)
        for chunk in chunks_of(body, 4096):
            hub.receive("dev1", chunk)
        grid.pull_messages([task_id])
        assert grid.uploads.spool.directory.parent == tmp_path / "uploads"
        assert len(grid.uploads.spool.files()) == 1
        hub.receive("dev1", _report(task_id, body, index))
        deadline = time.monotonic() + 5
        replies = grid.pull_messages([task_id])
        while not replies and time.monotonic() < deadline:
            replies = grid.pull_messages([task_id])
        [reply] = replies
        assert np.allclose(reply.content.array_records["arrays"]["W"].numpy(), 0.01)
        assert grid.uploads.spool.files() == []
    finally:
        grid.close()
        hub.stop()
    assert sessions(tmp_path / "uploads") == []


def test_the_service_spools_next_to_its_database_by_default(tmp_path: Path) -> None:
    key = tmp_path / "k.pub"
    config = ServiceConfig(
        db=tmp_path / "state.db", trust=TrustConfig(keys=(key,)), embedded_broker=True, dev=True
    )
    assert config.settings().upload_dir == tmp_path / "uploads"
    chosen = dataclasses.replace(config, upload_dir=tmp_path / "elsewhere")
    assert chosen.settings().upload_dir == tmp_path / "elsewhere"


def test_a_filesystem_that_cannot_preallocate_gets_a_sparse_file(
    receiver: UploadReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(spool_module.os, "posix_fallocate", unsupported)
    payload = payload_of(3 * 4096 + 17)
    for chunk in chunks_of(payload, 4096):
        receiver.receive("dev1", chunk, limit=LIMIT)
    assert bytes(receiver.take("dev1", sha256_hex(payload))) == payload
    assert not receiver.refusals
