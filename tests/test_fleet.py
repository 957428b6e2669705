"""The fleet view (statuses, ordering, Last Will) and device targets."""

from __future__ import annotations

import pytest

from coordinator.errors import CoordinatorError, TargetError
from coordinator.link.fleet import DeviceRecord, Fleet, Target
from edge_agent.protocol import ModelInfo, Status

SHA = "ab" * 32


def status(
    *,
    online: bool = True,
    models: tuple[ModelInfo, ...] = (),
    tags: tuple[str, ...] = (),
    agent_version: str = "0.1.0",
) -> Status:
    return Status(
        online=online,
        agent_version=agent_version,
        hardware={"machine": "aarch64", "cpu_count": 4, "load": 0.5},
        runtimes=("onnxruntime",),
        tags=tags,
        models=models,
    )


def digits(version: int) -> ModelInfo:
    return ModelInfo(name="digits", version=version, sha256=SHA)


# --- DeviceRecord -----------------------------------------------------------


def test_new_status_creates_record_with_every_field() -> None:
    fleet = Fleet()
    rec = fleet.update_status(
        "pi-1", status(models=(digits(3),), tags=("gpu",)), sent_at=100.0, now=105.0
    )
    assert rec == fleet.get("pi-1")
    assert rec.device_id == "pi-1"
    assert rec.online is True
    assert rec.agent_version == "0.1.0"
    assert dict(rec.hardware) == {"machine": "aarch64", "cpu_count": 4, "load": 0.5}
    assert rec.runtimes == ("onnxruntime",)
    assert rec.tags == ("gpu",)
    assert rec.models == (digits(3),)
    assert rec.last_seen == 105.0
    assert rec.status_sent_at == 100.0


def test_record_hardware_is_read_only_and_detached_from_message() -> None:
    msg = status()
    rec = Fleet().update_status("pi-1", msg, sent_at=1.0, now=1.0)
    msg.hardware["machine"] = "x86_64"
    assert rec.hardware["machine"] == "aarch64"
    with pytest.raises(TypeError):
        rec.hardware["machine"] = "x"  # type: ignore[index]


def test_model_version() -> None:
    other = ModelInfo(name="kws", version=1, sha256=SHA)
    rec = Fleet().update_status("pi-1", status(models=(digits(3), other)), sent_at=1, now=1)
    assert rec.model_version("digits") == 3
    assert rec.model_version("kws") == 1
    assert rec.model_version("absent") is None


# --- ordering -----------------------------------------------------------------


def test_newer_status_replaces_held_one() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(), sent_at=100, now=100)
    rec = fleet.update_status("pi-1", status(models=(digits(4),)), sent_at=110, now=111)
    assert rec.models == (digits(4),)
    assert rec.status_sent_at == 110
    assert rec.last_seen == 111


def test_older_status_is_ignored_but_bumps_last_seen() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(models=(digits(4),)), sent_at=110, now=111)
    rec = fleet.update_status("pi-1", status(models=(digits(3),)), sent_at=100, now=120)
    assert rec.models == (digits(4),)
    assert rec.status_sent_at == 110
    assert rec.last_seen == 120
    assert fleet.get("pi-1") == rec


def test_last_seen_never_moves_backwards() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(), sent_at=1, now=200)
    assert fleet.update_status("pi-1", status(), sent_at=2, now=150).last_seen == 200


def test_last_will_older_than_later_statuses_still_marks_offline() -> None:
    # The Will is encoded at connect time (sent_at 10); the agent then publishes
    # its online status (11) and a model update (20). When it drops, the broker
    # delivers the Will, older than the held status.
    fleet = Fleet()
    fleet.update_status("pi-1", status(models=(digits(2),)), sent_at=11, now=11)
    fleet.update_status("pi-1", status(models=(digits(3),)), sent_at=20, now=20)
    rec = fleet.update_status("pi-1", status(online=False, models=(digits(2),)), sent_at=10, now=30)
    assert rec.online is False
    assert rec.models == (digits(3),)  # the newer capabilities are kept
    assert rec.status_sent_at == 20
    assert rec.last_seen == 30


def test_stale_will_of_an_earlier_connection_is_ignored() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(), sent_at=11, now=11)  # connection 1 (Will 10)
    fleet.update_status("pi-1", status(online=False), sent_at=10, now=12)
    fleet.update_status("pi-1", status(), sent_at=31, now=31)  # connection 2 (Will 30)
    rec = fleet.update_status("pi-1", status(online=False), sent_at=10, now=40)
    assert rec.online is True
    assert rec.last_seen == 40
    # ...while connection 2's own Will is honoured.
    assert fleet.update_status("pi-1", status(online=False), sent_at=30, now=50).online is False


def test_device_whose_clock_went_back_comes_back_online_and_can_go_offline() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(), sent_at=1000, now=1000)
    fleet.update_status("pi-1", status(online=False), sent_at=990, now=1001)  # its Will
    rebooted = fleet.update_status("pi-1", status(), sent_at=950, now=1100)  # clock behind
    assert rebooted.online is True
    assert fleet.update_status("pi-1", status(online=False), sent_at=949, now=1200).online is False


def test_newer_offline_status_replaces_everything() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(models=(digits(2),)), sent_at=10, now=10)
    rec = fleet.update_status("pi-1", status(online=False, models=()), sent_at=12, now=13)
    assert rec.online is False
    assert rec.models == ()
    assert rec.status_sent_at == 12


def test_first_status_may_be_offline() -> None:
    fleet = Fleet()
    rec = fleet.update_status("pi-1", status(online=False), sent_at=5, now=6)
    assert rec.online is False
    assert "pi-1" in fleet


# --- clear, touch, collection -------------------------------------------------


def test_clear_removes_device() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(), sent_at=1, now=1)
    assert fleet.clear("pi-1") is True
    assert fleet.get("pi-1") is None
    assert "pi-1" not in fleet
    assert len(fleet) == 0
    assert fleet.clear("pi-1") is False


def test_cleared_device_accepts_any_later_status() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(), sent_at=100, now=100)
    fleet.clear("pi-1")
    assert fleet.update_status("pi-1", status(), sent_at=5, now=110).status_sent_at == 5


def test_touch_bumps_known_devices_only() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(), sent_at=1, now=10)
    assert fleet.touch("pi-1", 50) is True
    rec = fleet.get("pi-1")
    assert rec is not None
    assert rec.last_seen == 50
    assert rec.status_sent_at == 1
    assert fleet.touch("ghost", 50) is False
    assert "ghost" not in fleet
    assert len(fleet) == 1


def test_touch_never_moves_last_seen_backwards() -> None:
    fleet = Fleet()
    fleet.update_status("pi-1", status(), sent_at=1, now=10)
    fleet.touch("pi-1", 5)
    rec = fleet.get("pi-1")
    assert rec is not None
    assert rec.last_seen == 10


def test_records_sorted_and_len_contains() -> None:
    fleet = Fleet()
    for name in ("pi-3", "pi-1", "pi-2"):
        fleet.update_status(name, status(), sent_at=1, now=1)
    assert [r.device_id for r in fleet.records()] == ["pi-1", "pi-2", "pi-3"]
    assert len(fleet) == 3
    assert "pi-2" in fleet
    assert "pi-9" not in fleet
    assert 42 not in fleet


# --- Target -------------------------------------------------------------------


def _records() -> list[DeviceRecord]:
    fleet = Fleet()
    fleet.update_status("c", status(tags=("gpu", "lab")), sent_at=1, now=1)
    fleet.update_status("a", status(tags=("gpu",), online=False), sent_at=1, now=1)
    fleet.update_status("b", status(tags=("lab",)), sent_at=1, now=1)
    return fleet.records()


def ids(records: list[DeviceRecord]) -> list[str]:
    return [r.device_id for r in records]


def test_target_all_selects_everything_sorted_including_offline() -> None:
    target = Target.parse("all")
    assert target.kind == "all"
    assert ids(target.select(reversed(_records()))) == ["a", "b", "c"]
    assert target.missing(_records()) == []


def test_target_device_list() -> None:
    target = Target.parse("device:c,a")
    assert target.kind == "device"
    assert target.values == ("c", "a")
    assert ids(target.select(_records())) == ["a", "c"]


def test_target_device_missing_ids_in_given_order() -> None:
    target = Target.parse("device:zz,a,yy")
    assert ids(target.select(_records())) == ["a"]
    assert target.missing(_records()) == ["zz", "yy"]


def test_target_device_tolerates_spaces_and_duplicates() -> None:
    target = Target.parse("  device:a, b ,a ")
    assert target.values == ("a", "b")
    assert target.describe() == "device:a, b ,a"


def test_target_tag() -> None:
    target = Target.parse("tag:gpu")
    assert target.kind == "tag"
    assert ids(target.select(_records())) == ["a", "c"]
    assert ids(Target.parse("tag:lab").select(_records())) == ["b", "c"]
    assert Target.parse("tag:none").select(_records()) == []
    assert target.missing(_records()) == []


def test_target_describe_and_str_give_original_text() -> None:
    for text in ("all", "device:a,b", "tag:arch=arm64"):
        target = Target.parse(text)
        assert target.describe() == text
        assert str(target) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "everything",
        "ALL",
        "device:",
        "device:a,,b",
        "device:bad id",
        "device:coordinator",
        "device:-a",
        "tag:",
        "tag:a,b",
        "tag:has space",
        "host:a",
        ":a",
    ],
)
def test_target_parse_rejects_bad_text(text: str) -> None:
    with pytest.raises(TargetError) as info:
        Target.parse(text)
    message = str(info.value)
    assert "'all'" in message
    assert "device:ID" in message
    assert "tag:TAG" in message
    assert repr(text) in message


def test_target_error_is_a_coordinator_error_with_code() -> None:
    with pytest.raises(CoordinatorError) as info:
        Target.parse("nope")
    assert info.value.code == "bad_target"


def test_target_is_a_frozen_value() -> None:
    assert Target.parse("tag:gpu") == Target.parse("tag:gpu")
    with pytest.raises(AttributeError):
        Target.parse("all").kind = "tag"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("online", "examples", "can_train"),
    [(True, 120, True), (True, 0, False), (False, 120, False)],
)
def test_a_device_can_train_when_online_with_local_data(
    online: bool, examples: int, can_train: bool
) -> None:
    announced = Status(online=online, agent_version="0.1.0", train_examples=examples)
    record = DeviceRecord.from_status("pi-1", announced, sent_at=1.0, now=2.0)
    assert record.train_examples == examples
    assert record.can_train is can_train
