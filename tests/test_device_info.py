"""Tests for edge_agent.device_info: hardware facts for the status message."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import pytest

from edge_agent.device_info import MAX_VALUE_CHARS, clean_text, hardware_facts
from edge_agent.protocol import Status, decode, encode

KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,63}")
NO_MODEL = Path("/nonexistent/device-tree/model")


def test_facts_describe_this_machine() -> None:
    facts = hardware_facts(device_tree_model=NO_MODEL)
    assert facts["machine"] == platform.machine()
    assert facts["system"] == platform.system()
    assert facts["release"] == platform.release()
    assert facts["python"] == platform.python_version()
    assert facts["cpu_count"] == os.cpu_count()
    assert facts["memory_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert "model" not in facts
    assert all(KEY_RE.fullmatch(key) for key in facts)


def test_facts_encode_in_a_status_message(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    facts = hardware_facts(device_tree_model=model)
    status = Status(online=True, agent_version="0.1.0", hardware=facts)
    payload = encode(status, sender="dev-1", sent_at=0.0)
    decoded = decode(payload).message
    assert isinstance(decoded, Status)
    assert decoded.hardware == facts


def test_default_facts_encode() -> None:
    status = Status(online=True, agent_version="0.1.0", hardware=hardware_facts())
    assert decode(encode(status, sender="dev-1", sent_at=0.0)).message == status


def test_board_model_is_read_and_cleaned(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert hardware_facts(device_tree_model=model)["model"] == "Raspberry Pi 5 Model B Rev 1.0"
    model.write_bytes(b"\x00\x01 Weird\x1b[31m\xff board\x7f\n")
    assert hardware_facts(device_tree_model=model)["model"] == "Weird[31m\ufffd board"


def test_empty_or_unreadable_model_is_omitted(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"\x00\x00")
    assert "model" not in hardware_facts(device_tree_model=model)
    assert "model" not in hardware_facts(device_tree_model=tmp_path)  # a directory


def test_long_values_are_cut(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"A" * (MAX_VALUE_CHARS * 2))
    facts = hardware_facts(device_tree_model=model)
    assert facts["model"] == "A" * MAX_VALUE_CHARS
    encode(Status(online=True, agent_version="0.1.0", hardware=facts), sender="d", sent_at=0.0)


def test_clean_text_removes_control_format_and_surrogates() -> None:
    assert clean_text("  a\tb\u200bc\ud800d\x00e\u2028 ") == "abcde"
    assert clean_text("Pi \u00e9 \u4e2d") == "Pi \u00e9 \u4e2d"
    assert len(clean_text(" " + "x" * 5000)) == MAX_VALUE_CHARS


def test_failing_lookups_are_omitted(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> str:
        raise OSError("no uname here")

    monkeypatch.setattr(platform, "machine", broken)
    monkeypatch.setattr(platform, "release", lambda: "")
    monkeypatch.setattr(os, "cpu_count", lambda: None)

    def no_sysconf(name: str) -> int:
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    facts = hardware_facts(device_tree_model=NO_MODEL)
    assert set(facts) == {"system", "python"}


def test_unusable_numbers_are_omitted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2**60)
    monkeypatch.setattr(os, "sysconf", lambda name: -1)
    facts = hardware_facts(device_tree_model=NO_MODEL)
    assert "cpu_count" not in facts
    assert "memory_bytes" not in facts
