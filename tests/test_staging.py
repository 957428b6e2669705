"""Tests for edge_agent.ota.staging: crash-safe chunk staging with a journal."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import struct
from contextlib import closing
from pathlib import Path

import pytest

from edge_agent.errors import StateError, TransferError
from edge_agent.ota.staging import StagedTransfer, TransferInfo, list_transfers
from edge_agent.protocol import Chunk, chunk_count

CHUNK = 64
PAYLOAD = bytes((i * 7 + 3) % 251 for i in range(1000))  # 16 chunks, the last one 40 bytes
MANIFEST_BLOB = b"signed manifest bytes"
RECORD = struct.Struct(">I32s")  # the journal's record: u32 index + sha256


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def info_for(
    payload: bytes = PAYLOAD, chunk_size: int = CHUNK, deployment_id: str = "dep-1"
) -> TransferInfo:
    return TransferInfo(
        deployment_id=deployment_id,
        transfer_id=sha(payload),
        total_size=len(payload),
        chunk_size=chunk_size,
        chunk_count=chunk_count(len(payload), chunk_size),
    )


def chunk(index: int, payload: bytes = PAYLOAD, chunk_size: int = CHUNK) -> Chunk:
    return Chunk.from_payload(payload, index, chunk_size=chunk_size)


def create(root: Path, payload: bytes = PAYLOAD, chunk_size: int = CHUNK) -> StagedTransfer:
    return StagedTransfer.create(root, info_for(payload, chunk_size), MANIFEST_BLOB)


def held_set(transfer: StagedTransfer) -> set[int]:
    return {i for i in range(transfer.info.chunk_count) if transfer.has(i)}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "staging"


# ------------------------------------------------------------------- creation


def test_create_lays_out_the_directory(root: Path) -> None:
    info = info_for()
    with closing(StagedTransfer.create(root, info, MANIFEST_BLOB)) as transfer:
        directory = root / info.transfer_id
        assert transfer.directory == directory
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert TransferInfo.from_json((directory / "deploy.json").read_bytes()) == info
        assert (directory / "manifest.fsm").read_bytes() == MANIFEST_BLOB
        assert (directory / "payload.part").stat().st_size == len(PAYLOAD)
        assert (directory / "journal").read_bytes() == b""
        assert transfer.payload_path() == directory / "payload.part"
        assert transfer.held == 0
        assert not transfer.complete
        assert transfer.missing(1000) == list(range(16))


def test_create_replaces_an_existing_transfer_of_the_same_id(root: Path) -> None:
    first = create(root)
    first.write(chunk(0))
    first.close()
    with closing(create(root)) as second:
        assert second.held == 0
        assert (second.directory / "journal").read_bytes() == b""
    with closing(StagedTransfer.open(second.directory)) as reopened:
        assert reopened.held == 0


def test_create_reports_an_unwritable_staging_area_as_state_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"x")
    with pytest.raises(StateError, match="cannot create staging area"):
        create(not_a_dir)


def test_transfer_info_round_trips() -> None:
    info = info_for()
    assert TransferInfo.from_json(info.to_json()) == info
    assert json.loads(info.to_json())["chunk_count"] == 16


# --------------------------------------------------------------------- chunks


def test_out_of_order_writes_assemble_the_payload(root: Path) -> None:
    with closing(create(root)) as transfer:
        order = list(range(16))
        random.Random(7).shuffle(order)
        for n, index in enumerate(order, start=1):
            assert transfer.write(chunk(index)) is True
            assert transfer.has(index)
            assert transfer.held == n
            assert transfer.complete == (n == 16)
        assert transfer.payload_path().read_bytes() == PAYLOAD
        assert transfer.missing(10) == []


def test_duplicate_chunks_return_false_and_are_not_journaled_again(root: Path) -> None:
    with closing(create(root)) as transfer:
        assert transfer.write(chunk(3)) is True
        journal_size = (transfer.directory / "journal").stat().st_size
        assert journal_size == RECORD.size
        assert transfer.write(chunk(3)) is False
        assert transfer.write(chunk(3)) is False
        assert transfer.held == 1
        assert (transfer.directory / "journal").stat().st_size == journal_size


def test_journal_records_index_and_sha256(root: Path) -> None:
    with closing(create(root)) as transfer:
        transfer.write(chunk(5))
        transfer.write(chunk(15))
    journal = (transfer.directory / "journal").read_bytes()
    assert [RECORD.unpack_from(journal, o) for o in (0, RECORD.size)] == [
        (5, bytes.fromhex(chunk(5).sha256)),
        (15, bytes.fromhex(chunk(15).sha256)),
    ]


def test_missing_lists_lowest_indices_first_up_to_the_limit(root: Path) -> None:
    with closing(create(root)) as transfer:
        for index in (0, 1, 4, 9):
            transfer.write(chunk(index))
        assert transfer.missing(3) == [2, 3, 5]
        assert transfer.missing(1) == [2]
        assert transfer.missing(100) == [2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15]
        for index in transfer.missing(100)[:-1]:
            transfer.write(chunk(index))
        assert transfer.missing(5) == [15]


def test_a_chunk_of_another_transfer_raises(root: Path) -> None:
    with closing(create(root)) as transfer:
        other = bytes(reversed(PAYLOAD))
        foreign = chunk(0, payload=other)
        assert not transfer.matches(foreign)
        with pytest.raises(TransferError, match="does not belong"):
            transfer.write(foreign)
        assert transfer.held == 0
        assert (transfer.directory / "journal").read_bytes() == b""


@pytest.mark.parametrize(
    "foreign",
    [
        # same payload, other geometry
        pytest.param(Chunk.from_payload(PAYLOAD, 0, chunk_size=CHUNK * 2), id="chunk-size"),
        # same transfer id, other length
        pytest.param(
            Chunk.from_payload(PAYLOAD[:-1], 0, chunk_size=CHUNK, transfer_id=sha(PAYLOAD)),
            id="total-size",
        ),
    ],
)
def test_a_chunk_with_other_geometry_raises(root: Path, foreign: Chunk) -> None:
    with closing(create(root)) as transfer:
        with pytest.raises(TransferError):
            transfer.write(foreign)
        assert transfer.held == 0


def test_close_is_idempotent_and_discard_removes_the_directory(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(0))
    transfer.close()
    transfer.close()
    assert transfer.directory.is_dir()
    transfer.discard()
    assert not transfer.directory.exists()


# ------------------------------------------------------------ crash and resume


def test_reopen_after_a_crash_keeps_the_held_chunks(root: Path) -> None:
    transfer = create(root)
    for index in (0, 7, 15, 3):
        transfer.write(chunk(index))
    transfer.close()  # no discard: as if the process died here

    with closing(StagedTransfer.open(transfer.directory)) as reopened:
        assert reopened.info == transfer.info
        assert reopened.manifest_blob == MANIFEST_BLOB
        assert held_set(reopened) == {0, 3, 7, 15}
        assert reopened.write(chunk(7)) is False
        for index in reopened.missing(100):
            assert reopened.write(chunk(index)) is True
        assert reopened.complete
        assert reopened.payload_path().read_bytes() == PAYLOAD


def test_a_chunk_corrupted_after_journaling_is_dropped_on_reopen(root: Path) -> None:
    transfer = create(root)
    for index in range(4):
        transfer.write(chunk(index))
    transfer.close()
    with transfer.payload_path().open("r+b") as payload:
        payload.seek(2 * CHUNK + 10)
        byte = payload.read(1)
        payload.seek(2 * CHUNK + 10)
        payload.write(bytes([byte[0] ^ 0xFF]))

    with closing(StagedTransfer.open(transfer.directory)) as reopened:
        assert held_set(reopened) == {0, 1, 3}
        assert reopened.missing(3) == [2, 4, 5]
        assert reopened.write(chunk(2)) is True
        for index in reopened.missing(100):
            reopened.write(chunk(index))
        assert reopened.payload_path().read_bytes() == PAYLOAD


def test_a_torn_last_journal_record_is_ignored(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(0))
    transfer.write(chunk(1))
    transfer.close()
    # chunk 2's bytes reached the file, its journal record only partly
    records = b"".join(RECORD.pack(i, bytes.fromhex(chunk(i).sha256)) for i in (0, 1, 2))
    with transfer.payload_path().open("r+b") as payload:
        payload.seek(2 * CHUNK)
        payload.write(chunk(2).data)
    (transfer.directory / "journal").write_bytes(records[: 2 * RECORD.size + 20])

    with closing(StagedTransfer.open(transfer.directory)) as reopened:
        assert held_set(reopened) == {0, 1}


def test_chunks_written_after_a_torn_record_survive_the_next_reopen(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(0))
    transfer.close()
    with (transfer.directory / "journal").open("ab") as journal:
        journal.write(RECORD.pack(1, bytes.fromhex(chunk(1).sha256))[:13])  # torn

    with closing(StagedTransfer.open(transfer.directory)) as resumed:
        assert held_set(resumed) == {0}
        assert resumed.write(chunk(1)) is True
        assert resumed.write(chunk(2)) is True

    with closing(StagedTransfer.open(transfer.directory)) as again:
        assert held_set(again) == {0, 1, 2}


def test_a_chunk_written_but_not_journaled_is_not_counted(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(0))
    transfer.close()
    with transfer.payload_path().open("r+b") as payload:
        payload.seek(5 * CHUNK)
        payload.write(chunk(5).data)

    with closing(StagedTransfer.open(transfer.directory)) as reopened:
        assert held_set(reopened) == {0}
        assert reopened.write(chunk(5)) is True


def test_journal_records_with_out_of_range_indices_are_ignored(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(0))
    transfer.close()
    with (transfer.directory / "journal").open("ab") as journal:
        journal.write(RECORD.pack(16, bytes.fromhex(chunk(0).sha256)))
        journal.write(RECORD.pack(0xFFFFFFFF, bytes(32)))

    with closing(StagedTransfer.open(transfer.directory)) as reopened:
        assert held_set(reopened) == {0}
        assert reopened.held == 1


def test_a_duplicated_journal_record_counts_once(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(4))
    transfer.close()
    with (transfer.directory / "journal").open("ab") as journal:
        journal.write(RECORD.pack(4, bytes.fromhex(chunk(4).sha256)))

    with closing(StagedTransfer.open(transfer.directory)) as reopened:
        assert reopened.held == 1
        assert reopened.has(4)


def test_open_or_discard_removes_a_directory_with_a_wrong_size_payload(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(0))
    transfer.close()
    os.truncate(transfer.payload_path(), len(PAYLOAD) - 1)

    with pytest.raises(StateError, match="wrong size"):
        StagedTransfer.open(transfer.directory)
    assert transfer.directory.is_dir()  # open() alone deletes nothing
    assert StagedTransfer.open_or_discard(transfer.directory) is None
    assert not transfer.directory.exists()


def test_open_or_discard_returns_a_healthy_transfer(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(2))
    transfer.close()
    reopened = StagedTransfer.open_or_discard(transfer.directory)
    assert reopened is not None
    try:
        assert held_set(reopened) == {2}
    finally:
        reopened.close()


@pytest.mark.parametrize(
    "deploy_json",
    [
        pytest.param(b"not json", id="garbage"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"deployment_id": "d"}', id="missing-fields"),
        pytest.param(
            json.dumps({**json.loads(info_for().to_json()), "chunk_count": 15}).encode(),
            id="wrong-chunk-count",
        ),
        pytest.param(
            json.dumps({**json.loads(info_for().to_json()), "chunk_size": 0}).encode(),
            id="zero-chunk-size",
        ),
        pytest.param(
            json.dumps({**json.loads(info_for().to_json()), "total_size": -5}).encode(),
            id="negative-total-size",
        ),
        pytest.param(
            json.dumps({**json.loads(info_for().to_json()), "total_size": "many"}).encode(),
            id="non-integer-size",
        ),
    ],
)
def test_an_unusable_deploy_json_is_a_state_error(root: Path, deploy_json: bytes) -> None:
    transfer = create(root)
    transfer.close()
    (transfer.directory / "deploy.json").write_bytes(deploy_json)

    with pytest.raises(StateError):
        StagedTransfer.open(transfer.directory)
    assert StagedTransfer.open_or_discard(transfer.directory) is None
    assert not transfer.directory.exists()


@pytest.mark.parametrize("lost", ["manifest.fsm", "payload.part", "journal"])
def test_a_missing_file_is_a_state_error(root: Path, lost: str) -> None:
    transfer = create(root)
    transfer.close()
    (transfer.directory / lost).unlink()
    with pytest.raises(StateError):
        StagedTransfer.open(transfer.directory)


def test_list_transfers_removes_directories_without_deploy_json(root: Path) -> None:
    older = create(root)
    older.close()
    newer = create(root, payload=PAYLOAD[:500])
    newer.close()
    os.utime(older.directory, (1_000_000, 1_000_000))
    os.utime(newer.directory, (2_000_000, 2_000_000))
    unfinished = root / ("ab" * 32)
    unfinished.mkdir()
    (unfinished / "payload.part").write_bytes(b"x")
    os.utime(unfinished, (1_500_000, 1_500_000))
    stray = root / "stray-file"
    stray.write_bytes(b"")

    assert list_transfers(root) == [older.directory, newer.directory]
    assert not unfinished.exists()
    assert stray.exists()


def test_list_transfers_orders_oldest_first(root: Path) -> None:
    first = create(root)
    first.close()
    second = create(root, payload=PAYLOAD[:500])
    second.close()
    os.utime(first.directory, (3_000_000, 3_000_000))
    os.utime(second.directory, (1_000_000, 1_000_000))
    assert list_transfers(root) == [second.directory, first.directory]


def test_list_transfers_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert list_transfers(tmp_path / "nowhere") == []


def test_relabel_persists_across_reopen(root: Path) -> None:
    transfer = create(root)
    transfer.write(chunk(1))
    transfer.relabel("dep-2")
    assert transfer.info.deployment_id == "dep-2"
    assert transfer.info.transfer_id == sha(PAYLOAD)
    transfer.close()

    with closing(StagedTransfer.open(transfer.directory)) as reopened:
        assert reopened.info == info_for(deployment_id="dep-2")
        assert held_set(reopened) == {1}


# ------------------------------------------------------------------ edge cases


def test_an_empty_payload_is_one_empty_chunk(root: Path) -> None:
    assert chunk_count(0, CHUNK) == 1
    with closing(create(root, payload=b"")) as transfer:
        assert transfer.info.chunk_count == 1
        assert not transfer.complete
        assert transfer.missing(5) == [0]
        empty = chunk(0, payload=b"")
        assert empty.data == b""
        assert transfer.write(empty) is True
        assert transfer.complete
        assert transfer.write(empty) is False
        assert transfer.payload_path().read_bytes() == b""
    with closing(StagedTransfer.open(transfer.directory)) as reopened:
        assert reopened.complete


def test_a_payload_of_exactly_one_chunk(root: Path) -> None:
    payload = PAYLOAD[:CHUNK]
    with closing(create(root, payload=payload)) as transfer:
        assert transfer.info.chunk_count == 1
        assert transfer.write(chunk(0, payload=payload)) is True
        assert transfer.complete
        assert transfer.payload_path().read_bytes() == payload
