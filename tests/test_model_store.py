"""Tests for edge_agent.ota.model_store: A/B slots and an atomically replaced state file."""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import StateError
from edge_agent.ota.model_store import SLOTS, InstalledModel, ModelStore, StoreState

PAYLOAD_A = b"model bytes, first version" * 10
PAYLOAD_B = b"model bytes, second version" * 10
BLOB_A = b"signed manifest A"
BLOB_B = b"signed manifest B"


def model(slot: str, version: int, payload: bytes, name: str = "digits") -> InstalledModel:
    return InstalledModel(
        slot=slot,
        name=name,
        version=version,
        sha256=hashlib.sha256(payload).hexdigest(),
        format="onnx",
        installed_at=1_700_000_000.0 + version,
    )


def staged_file(tmp_path: Path, payload: bytes) -> Path:
    path = tmp_path / f"staged-{hashlib.sha256(payload).hexdigest()[:8]}"
    path.write_bytes(payload)
    return path


def install(
    store: ModelStore, tmp_path: Path, version: int, payload: bytes, blob: bytes
) -> InstalledModel:
    """What the installer does, minus the runtime: prepare, fill, commit."""
    slot = store.prepare_slot()
    store.fill_slot(slot, staged_file(tmp_path, payload), blob)
    installed = model(slot, version, payload)
    state = store.state
    store.commit(
        StoreState(current=installed, previous=state.current, highest=state.highest).with_highest(
            installed.name, installed.version
        )
    )
    return installed


def on_disk(store: ModelStore) -> StoreState:
    return StoreState.from_bytes((store.root / "state.json").read_bytes())


def state_json(**changes: Any) -> bytes:
    obj: dict[str, Any] = {
        "schema": 1,
        "current": model("a", 2, PAYLOAD_A).to_json(),
        "previous": None,
        "highest": {"digits": 2},
    }
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# ---------------------------------------------------------------- empty store


def test_an_empty_store(data_dir: Path) -> None:
    store = ModelStore(data_dir)
    assert store.state == StoreState()
    assert store.state.current is None
    assert store.state.previous is None
    assert store.state.highest_version("digits") is None
    assert not (data_dir / "state.json").exists()
    for slot in SLOTS:
        assert store.slot_dir(slot) == data_dir / "slots" / slot
        assert store.slot_dir(slot).is_dir()
    assert store.free_slot() == "a"


def test_an_unusable_data_dir_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StateError, match="cannot create"):
        ModelStore(blocker)


# ---------------------------------------------------------------- slot choice


def test_prepare_slot_picks_the_slot_that_is_not_current(data_dir: Path) -> None:
    store = ModelStore(data_dir)
    store.commit(StoreState(current=model("a", 1, PAYLOAD_A)))
    (store.slot_dir("a") / "payload").write_bytes(PAYLOAD_A)
    (store.slot_dir("b") / "leftover").write_bytes(b"junk")

    assert store.free_slot() == "b"
    assert store.prepare_slot() == "b"
    assert list(store.slot_dir("b").iterdir()) == []
    assert (store.slot_dir("a") / "payload").read_bytes() == PAYLOAD_A

    store.commit(StoreState(current=model("b", 2, PAYLOAD_B)))
    assert store.prepare_slot() == "a"
    assert list(store.slot_dir("a").iterdir()) == []


def test_prepare_slot_stops_naming_the_previous_before_emptying_its_slot(
    data_dir: Path,
) -> None:
    store = ModelStore(data_dir)
    current, previous = model("b", 2, PAYLOAD_B), model("a", 1, PAYLOAD_A)
    store.commit(StoreState(current=current, previous=previous, highest=(("digits", 2),)))
    (store.slot_dir("a") / "payload").write_bytes(PAYLOAD_A)

    assert store.prepare_slot() == "a"
    expected = StoreState(current=current, previous=None, highest=(("digits", 2),))
    assert on_disk(store) == expected
    assert store.state == expected
    assert ModelStore(data_dir).state == expected
    assert list(store.slot_dir("a").iterdir()) == []


def test_prepare_slot_keeps_a_previous_in_the_other_slot(data_dir: Path) -> None:
    store = ModelStore(data_dir)
    # no current (e.g. after a failed first install) and the previous in slot b
    store.commit(StoreState(previous=model("b", 1, PAYLOAD_B)))
    assert store.prepare_slot() == "a"
    assert on_disk(store).previous == model("b", 1, PAYLOAD_B)


def test_prepare_slot_drops_a_previous_in_the_free_slot_without_current(
    data_dir: Path,
) -> None:
    store = ModelStore(data_dir)
    store.commit(StoreState(previous=model("a", 1, PAYLOAD_A)))
    assert store.prepare_slot() == "a"
    assert on_disk(store).previous is None


# ------------------------------------------------------ fill, commit, reopen


def test_fill_commit_and_reopen_restore_the_state(data_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(data_dir)
    slot = store.prepare_slot()
    source = staged_file(tmp_path, PAYLOAD_A)
    store.fill_slot(slot, source, BLOB_A)
    assert not source.exists()  # moved, not copied
    installed = model(slot, 1, PAYLOAD_A)
    state = StoreState(current=installed).with_highest("digits", 1)
    store.commit(state)
    assert store.state == state
    assert stat.S_IMODE((data_dir / "state.json").stat().st_mode) == 0o600

    reopened = ModelStore(data_dir)
    assert reopened.state == state
    assert reopened.state.current == installed
    assert reopened.read_payload(installed) == PAYLOAD_A
    assert reopened.read_manifest_blob(slot) == BLOB_A
    assert reopened.free_slot() == "b"


def test_two_installs_alternate_slots_and_keep_the_previous(data_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(data_dir)
    first = install(store, tmp_path, 1, PAYLOAD_A, BLOB_A)
    second = install(store, tmp_path, 2, PAYLOAD_B, BLOB_B)
    assert (first.slot, second.slot) == ("a", "b")

    reopened = ModelStore(data_dir)
    assert reopened.state.current == second
    assert reopened.state.previous == first
    assert reopened.state.highest_version("digits") == 2
    assert reopened.read_payload(first) == PAYLOAD_A
    assert reopened.read_payload(second) == PAYLOAD_B
    assert reopened.read_manifest_blob("a") == BLOB_A
    assert reopened.read_manifest_blob("b") == BLOB_B


def test_read_payload_detects_a_modified_payload(data_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(data_dir)
    installed = install(store, tmp_path, 1, PAYLOAD_A, BLOB_A)
    path = store.slot_dir(installed.slot) / "payload"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="does not match the sha256"):
        store.read_payload(installed)


def test_read_payload_of_a_missing_file_is_a_state_error(data_dir: Path) -> None:
    store = ModelStore(data_dir)
    with pytest.raises(StateError):
        store.read_payload(model("a", 1, PAYLOAD_A))
    with pytest.raises(StateError):
        store.read_manifest_blob("a")


def test_a_failed_commit_keeps_the_previous_state(data_dir: Path) -> None:
    store = ModelStore(data_dir)
    before = StoreState(current=model("a", 1, PAYLOAD_A)).with_highest("digits", 1)
    store.commit(before)
    (data_dir / "state.json").unlink()
    (data_dir / "state.json").mkdir()  # os.replace onto a directory fails

    with pytest.raises(StateError, match="cannot write"):
        store.commit(StoreState(current=model("b", 2, PAYLOAD_B)))
    assert store.state == before


# ------------------------------------------------------------ version counters


def test_with_highest_only_grows() -> None:
    state = StoreState()
    raised = state.with_highest("digits", 5)
    assert state.highest_version("digits") is None  # a copy; the original is unchanged
    assert raised.highest_version("digits") == 5
    assert raised.with_highest("digits", 3).highest_version("digits") == 5
    assert raised.with_highest("digits", 5).highest_version("digits") == 5
    assert raised.with_highest("digits", 9).highest_version("digits") == 9
    assert raised.with_highest("digits", 0).highest_version("digits") == 5


def test_with_highest_keeps_other_names_sorted() -> None:
    state = StoreState().with_highest("zeta", 2).with_highest("alpha", 7).with_highest("zeta", 1)
    assert state.highest == (("alpha", 7), ("zeta", 2))
    assert state.highest_version("alpha") == 7
    assert state.highest_version("beta") is None


def test_counters_survive_reopen_and_a_rollback_of_current(data_dir: Path) -> None:
    store = ModelStore(data_dir)
    state = StoreState(current=model("a", 4, PAYLOAD_A)).with_highest("digits", 4)
    store.commit(state.with_highest("other", 11))
    # current goes back to an older version; the counter does not
    older = StoreState(current=model("b", 2, PAYLOAD_B), highest=store.state.highest)
    store.commit(older.with_highest("digits", 2))

    reopened = ModelStore(data_dir)
    assert reopened.state.highest_version("digits") == 4
    assert reopened.state.highest_version("other") == 11
    assert reopened.state.current == model("b", 2, PAYLOAD_B)


def test_the_slot_floor_grows_with_any_name_and_survives_reopen(data_dir: Path) -> None:
    store = ModelStore(data_dir)
    store.commit(StoreState(current=model("a", 5, PAYLOAD_A)).with_highest("digits", 5))
    # the serving model goes back to v2 (a rollback): the floor stays at 5
    store.commit(replace(store.state, current=model("b", 2, PAYLOAD_B)).with_highest("digits", 2))
    assert store.state.floor == 5
    assert ModelStore(data_dir).state.slot_floor() == 5
    assert json.loads((data_dir / "state.json").read_bytes())["floor"] == 5


def test_an_older_state_json_without_a_floor_uses_the_current_version(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / "state.json").write_bytes(state_json())  # written before the floor existed
    state = ModelStore(data_dir).state
    assert state.floor == 0
    assert state.slot_floor() == 2  # the current model's version still counts
    assert StoreState().slot_floor() == 0


# ------------------------------------------------------------ state.json parse


def test_state_round_trips_through_bytes() -> None:
    state = StoreState(
        current=model("b", 3, PAYLOAD_B), previous=model("a", 2, PAYLOAD_A)
    ).with_highest("digits", 3)
    data = state.to_bytes()
    assert json.loads(data)["schema"] == 1
    assert StoreState.from_bytes(data) == state


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"{ not json", "not valid JSON", id="garbage"),
        pytest.param(b"", "not valid JSON", id="empty"),
        pytest.param(b"\xff\xfe\xfa", "not valid JSON", id="not-utf8"),
        pytest.param(b"[1, 2]", "unknown schema", id="not-an-object"),
        pytest.param(b'{"current": null, "highest": {}}', "unknown schema", id="no-schema"),
        pytest.param(state_json(highest=None), "bad 'highest'", id="no-highest"),
        pytest.param(state_json(highest={"digits": "2"}), "bad 'highest'", id="str-counter"),
        pytest.param(state_json(highest={"digits": True}), "bad 'highest'", id="bool-counter"),
        pytest.param(state_json(highest={"digits": 2.5}), "bad 'highest'", id="float-counter"),
        pytest.param(state_json(floor=-1), "bad slot 'floor'", id="negative-floor"),
        pytest.param(state_json(floor=True), "bad slot 'floor'", id="bool-floor"),
        pytest.param(state_json(current={"slot": "a"}), "bad model entry", id="missing-fields"),
        pytest.param(state_json(current=[1]), "bad model entry", id="entry-not-object"),
        pytest.param(
            state_json(current={**model("a", 1, PAYLOAD_A).to_json(), "version": "one"}),
            "bad model entry",
            id="bad-version",
        ),
        pytest.param(
            state_json(previous={**model("a", 1, PAYLOAD_A).to_json(), "slot": "c"}),
            "bad slot",
            id="bad-slot",
        ),
    ],
)
def test_a_corrupt_state_json_is_a_clear_state_error(
    data_dir: Path, data: bytes, message: str
) -> None:
    data_dir.mkdir()
    (data_dir / "state.json").write_bytes(data)
    with pytest.raises(StateError, match=message) as caught:
        ModelStore(data_dir)
    assert "state.json" in str(caught.value)


def test_a_newer_schema_is_refused(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / "state.json").write_bytes(state_json(schema=2))
    with pytest.raises(StateError, match=r"state\.json has an unknown schema"):
        ModelStore(data_dir)


def test_a_state_json_that_is_a_directory_is_a_state_error(data_dir: Path) -> None:
    (data_dir / "state.json").mkdir(parents=True)
    with pytest.raises(StateError, match="directory"):
        ModelStore(data_dir)


def test_a_huge_state_json_is_refused(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / "state.json").write_bytes(b" " * (1024 * 1024 + 1))
    with pytest.raises(StateError, match="too large"):
        ModelStore(data_dir)


# ---------------------------------------------------------------- discard_slot


def test_discard_slot_never_removes_current_or_previous(data_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(data_dir)
    first = install(store, tmp_path, 1, PAYLOAD_A, BLOB_A)
    second = install(store, tmp_path, 2, PAYLOAD_B, BLOB_B)
    store.discard_slot(first.slot)  # previous
    store.discard_slot(second.slot)  # current
    assert store.read_payload(first) == PAYLOAD_A
    assert store.read_payload(second) == PAYLOAD_B
    assert store.read_manifest_blob(first.slot) == BLOB_A


def test_discard_slot_empties_a_slot_nobody_names(data_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(data_dir)
    install(store, tmp_path, 1, PAYLOAD_A, BLOB_A)
    slot = store.prepare_slot()
    store.fill_slot(slot, staged_file(tmp_path, PAYLOAD_B), BLOB_B)
    assert slot == "b"

    store.discard_slot(slot)
    assert store.slot_dir(slot).is_dir()
    assert list(store.slot_dir(slot).iterdir()) == []
    assert (store.slot_dir("a") / "payload").read_bytes() == PAYLOAD_A
