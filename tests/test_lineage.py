"""Lineage records: strict JSON form, size bound, and their place in the manifest."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pytest

from compress.errors import LineageError, ManifestError
from compress.lineage import (
    MAX_LINEAGE_BYTES,
    CodeVersion,
    DataWindow,
    Lineage,
    ParentRef,
    Trigger,
)
from compress.manifest import Manifest
from tests.conftest import make_manifest

PARENT = ParentRef(name="har", version=3, sha256="ab" * 32)


def _full() -> Lineage:
    return Lineage(
        trigger=Trigger.by_policy("drift-guard", drift=0.31, reason="fleet PSI over 0.2"),
        code=CodeVersion(fedge="0.1.0", commit="0123456789abcdef0123456789abcdef01234567"),
        run_id="run-0123456789ab",
        rounds=5,
        strategy="fedavg",
        codec="topk:0.1",
        participants=8,
        window=DataWindow(start=1_700_000_000, end=1_700_003_600),
        parent=PARENT,
    )


def test_round_trip_full_and_manual() -> None:
    full = _full()
    assert Lineage.from_dict(json.loads(full.to_bytes())) == full
    manual = Lineage(trigger=Trigger.manual(), code=CodeVersion(fedge="0.1.0"))
    obj = manual.to_dict()
    assert obj["trigger"] == {"kind": "manual"}
    assert obj["parent"] is None
    assert obj["run_id"] is None
    assert Lineage.from_dict(obj) == manual


def test_summary_names_run_trigger_parent_and_code() -> None:
    text = _full().summary()
    assert "run run-0123456789ab (5 rounds, fedavg, topk:0.1, 8 devices)" in text
    assert "policy drift-guard (drift 0.31)" in text
    assert "parent har v3" in text
    assert "fedge 0.1.0 (0123456789ab)" in text


def _mutated(**changes: Any) -> dict[str, Any]:
    obj = _full().to_dict()
    obj.update(changes)
    return obj


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"zz": 1}, "unknown field"),
        ({"trigger": {"kind": "cron"}}, "kind"),
        ({"trigger": {"kind": "manual", "policy": "p"}}, "unknown field"),
        ({"trigger": {"kind": "policy", "policy": "p", "drift": None}}, "reason.*missing"),
        ({"trigger": {"kind": "policy", "policy": "p", "drift": -1.0, "reason": ""}}, "drift"),
        ({"trigger": {"kind": "policy", "policy": "p", "drift": True, "reason": ""}}, "drift"),
        ({"trigger": {"kind": "policy", "policy": "../x", "drift": 0.1, "reason": ""}}, "policy"),
        (
            {"trigger": {"kind": "policy", "policy": "p", "drift": 0.1, "reason": "a\x1b[2J"}},
            "reason",
        ),
        ({"rounds": -1}, "rounds"),
        ({"rounds": 1.5}, "rounds"),
        ({"participants": "8"}, "participants"),
        ({"run_id": "run 1"}, "run_id"),
        ({"codec": "x" * 65}, "codec"),
        ({"window": {"start": 10, "end": 5}}, "end is before start"),
        ({"window": {"start": 1}}, "end.*missing"),
        ({"parent": {"name": "Har", "version": 1, "sha256": "ab" * 32}}, "name"),
        ({"parent": {"name": "har", "version": 0, "sha256": "ab" * 32}}, "version"),
        ({"parent": {"name": "har", "version": 1, "sha256": "zz"}}, "sha256"),
        ({"code": {"fedge": "0.1.0"}}, "commit.*missing"),
        ({"code": {"fedge": "0.1.0", "commit": "XYZ"}}, "commit"),
        ({"parent": ["har", 1]}, "parent"),
    ],
)
def test_hostile_records_are_refused_and_logged(
    changes: dict[str, Any], match: str, caplog: pytest.LogCaptureFixture
) -> None:
    obj = _full().to_dict()
    obj.update(changes)
    with (
        caplog.at_level(logging.WARNING, "compress.lineage"),
        pytest.raises(LineageError, match=match),
    ):
        Lineage.from_dict(obj)
    assert "refused a lineage record" in caplog.text


def test_missing_key_is_refused() -> None:
    obj = _full().to_dict()
    del obj["codec"]
    with pytest.raises(LineageError, match=r"lineage\.codec: missing"):
        Lineage.from_dict(obj)


def test_largest_valid_record_fits_the_bound() -> None:
    widest = "\U0001f600" * 256  # four UTF-8 bytes each: the reason is bounded in characters
    obj = _full().to_dict()
    obj["trigger"] = {"kind": "policy", "policy": "p" * 64, "drift": 123456.789012345,
                      "reason": widest}  # fmt: skip
    obj.update(run_id="r" * 64, strategy="s" * 64, codec="c" * 64, rounds=10**9,
               participants=10**9)  # fmt: skip
    obj["window"] = {"start": 2**40, "end": 2**40}
    obj["parent"] = {"name": "n" * 64, "version": 2**53, "sha256": "f" * 64}
    obj["code"] = {"fedge": "v" * 32, "commit": "a" * 40}
    record = Lineage.from_dict(obj)
    assert len(record.to_bytes()) <= MAX_LINEAGE_BYTES
    obj["trigger"]["reason"] = widest + "x"
    with pytest.raises(LineageError, match="reason"):
        Lineage.from_dict(obj)


def test_constructor_validates() -> None:
    with pytest.raises(LineageError, match="rounds"):
        dataclasses.replace(_full(), rounds=-3)
    with pytest.raises(LineageError, match="policy"):
        Trigger(kind="policy", policy=None, drift=None, reason="")


def test_manifest_carries_lineage_and_old_manifests_stay_valid() -> None:
    old = make_manifest()
    assert old.lineage is None
    assert "lineage" not in old.to_dict()
    assert Manifest.from_bytes(old.to_bytes()) == old
    with_lineage = dataclasses.replace(old, lineage=_full())
    parsed = Manifest.from_bytes(with_lineage.to_bytes())
    assert parsed.lineage == _full()
    assert parsed.to_bytes() == with_lineage.to_bytes()


def test_manifest_refuses_hostile_lineage() -> None:
    obj = dataclasses.replace(make_manifest(), lineage=_full()).to_dict()
    obj["lineage"]["parent"]["sha256"] = "0" * 63
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ManifestError, match=r"manifest\.lineage\.parent\.sha256"):
        Manifest.from_bytes(data)
    obj["lineage"]["parent"] = PARENT.to_dict()
    obj["lineage"]["extra"] = "x"
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ManifestError, match="unknown field"):
        Manifest.from_bytes(data)
