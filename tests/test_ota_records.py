"""Tests for edge_agent.ota.records: the flat JSON records of the OTA state files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.errors import StateError
from edge_agent.ota.records import record_from_json, record_to_json, write_state_file
from edge_agent.ota.staging import TransferInfo


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    count: int
    at: float


@dataclass(frozen=True)
class Nested:
    row: Row


def test_a_record_round_trips_in_field_order() -> None:
    row = Row("a", 3, 1.5)
    assert list(record_to_json(row).items()) == [("name", "a"), ("count", 3), ("at", 1.5)]
    assert record_from_json(Row, record_to_json(row), "bad row") == row


def test_values_are_converted_to_the_declared_types() -> None:
    row = record_from_json(Row, {"name": 7, "count": "4", "at": 2, "extra": None}, "bad row")
    assert row == Row("7", 4, 2.0)
    assert isinstance(row.at, float)


@pytest.mark.parametrize(
    "obj",
    [
        {"name": "a", "count": 1},
        {"name": "a", "count": "one", "at": 0.0},
        {"name": "a", "count": None, "at": 0.0},
        [1, 2, 3],
        "text",
    ],
    ids=["missing", "not-a-number", "null", "list", "string"],
)
def test_a_bad_object_is_a_state_error_named_by_the_caller(obj: object) -> None:
    with pytest.raises(StateError, match=r"^bad row: "):
        record_from_json(Row, obj, "bad row")


def test_a_field_of_another_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match=r"Nested\.row is not a str, int or float field"):
        record_from_json(Nested, {"row": {}}, "bad")


def test_deploy_json_that_is_not_json_is_unreadable() -> None:
    with pytest.raises(StateError, match=r"unreadable deploy\.json"):
        TransferInfo.from_json(b"\xff{not json")
    with pytest.raises(StateError, match=r"unreadable deploy\.json: 'chunk_count'"):
        TransferInfo.from_json(
            b'{"deployment_id": "d", "transfer_id": "t", "total_size": 1, "chunk_size": 1}'
        )


def test_write_state_file_is_private_and_names_the_failure(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_state_file(path, b"{}", verb="write")
    assert path.read_bytes() == b"{}"
    assert path.stat().st_mode & 0o777 == 0o600
    missing = tmp_path / "gone" / "deploy.json"
    with pytest.raises(StateError, match=rf"^cannot update {re.escape(str(missing))}: "):
        write_state_file(missing, b"{}", verb="update")
