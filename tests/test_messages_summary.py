"""The window summary on the wire: round trip, byte budget, hostile decodes."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from compress.profile import profile_from_data
from edge_agent.errors import MalformedMessageError, SummaryError
from edge_agent.protocol import (
    InvalidCounts,
    TelemetryBatch,
    WindowSummary,
    decode,
    encode,
)
from edge_agent.protocol.messages_summary import MAX_CELL, MAX_COUNT, MAX_SUMMARY_BYTES
from tests.test_protocol_messages import record

RNG = np.random.default_rng(3)


def _summary(f: int = 4, k: int | None = 3, n: int = 30, conf: bool = True) -> WindowSummary:
    feats = np.stack([RNG.multinomial(n, [0.1] * 10) for _ in range(f)])
    return WindowSummary.from_arrays(
        n=n,
        features=feats,
        confidence=RNG.multinomial(n, [0.1] * 10) if conf else None,
        classes=None if k is None else RNG.multinomial(n, [1 / k] * k),
        invalid=InvalidCounts(shape=1, nan=2, out_of_range=3),
    )


@pytest.mark.parametrize(("k", "conf"), [(3, True), (None, True), (None, False)])
def test_round_trip(k: int | None, conf: bool) -> None:
    summary = _summary(k=k, conf=conf)
    assert WindowSummary.from_json(summary.to_json()) == summary
    assert summary.feature_counts().shape == (4, 10)


def test_worst_case_fits_the_byte_budget() -> None:
    big = MAX_COUNT
    summary = WindowSummary(
        n=big,
        features=((MAX_CELL,) * 10,) * 64,
        confidence=(MAX_CELL,) * 10,
        classes=(MAX_CELL,) * 100,
        invalid=InvalidCounts(shape=big, dtype=big, nan=big, out_of_range=big),
    )
    assert summary.encoded_size() <= MAX_SUMMARY_BYTES
    assert WindowSummary.from_json(summary.to_json()) == summary


def test_cells_saturate() -> None:
    summary = WindowSummary.from_arrays(
        n=70_000,
        features=[[70_000] + [0] * 9],
        confidence=None,
        classes=[69_000, 1_000],
        invalid=InvalidCounts(),
    )
    assert summary.features[0][0] == MAX_CELL
    assert summary.classes == (MAX_CELL, 1_000)
    assert WindowSummary.from_json(summary.to_json()) == summary


def test_telemetry_record_carries_the_summary() -> None:
    summary = _summary()
    batch = TelemetryBatch(seq=4, records=(record(summary=summary), record()))
    decoded = decode(encode(batch, sender="pi-7", sent_at=1.0)).message
    assert isinstance(decoded, TelemetryBatch)
    assert decoded.records[0].summary == summary
    assert decoded.records[1].summary is None


def _wire(**changes: Any) -> dict[str, Any]:
    return _summary().to_json() | changes


def _counts(values: list[int]) -> str:
    return base64.b85encode(np.asarray(values, dtype="<u2").tobytes()).decode()


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (_wire(f=65), "f"),
        (_wire(f=0), "f"),
        (_wire(k=101), "k"),
        (_wire(k=1), "k"),
        (_wire(n=-1), "n"),
        (_wire(n=2**32), "n"),
        (_wire(n=float("nan")), "n"),
        (_wire(counts=_counts([3] * 62)), "uint16 cells"),  # one cell short
        (_wire(counts="~~~~~"), "base85"),
        (_wire(counts='"\\'), "base85"),
        (_wire(counts=_counts([4] * 10 + [0] * 43)), "sums to"),  # feature 0: 40, not 30
        (_wire(n=31), "sums to"),
        (_wire(invalid={"shape": 0}), "invalid"),
        (_wire(invalid={"shape": -1, "dtype": 0, "nan": 0, "out_of_range": 0}), "shape"),
        (_wire(invalid={"shape": 0, "dtype": 0, "nan": 0, "out_of_range": 0, "x": 1}), "invalid"),
        (_wire(confidence="yes"), "confidence"),
        (_wire(counts="A" * 5000), "counts"),
    ],
)
def test_hostile_summaries_are_refused(wire: dict[str, Any], match: str) -> None:
    with pytest.raises(SummaryError, match=match):
        WindowSummary.from_json(wire)


def test_non_canonical_base85_is_refused() -> None:
    wire = _summary().to_json()
    # b85 pads on decode: the text of a shorter payload plus junk decodes to other bytes.
    with pytest.raises(SummaryError, match="cells"):
        WindowSummary.from_json(wire | {"counts": wire["counts"][:-1]})


def test_hostile_summary_in_a_batch_is_a_malformed_message() -> None:
    bad = _summary().to_json() | {"n": 31}
    batch = TelemetryBatch(seq=1, records=(record(summary=_summary()),))
    good = encode(batch, sender="pi-7", sent_at=1.0)
    payload = good.replace(b'"n":30', b'"n":31')
    assert payload != good
    assert bad["n"] == 31
    with pytest.raises(MalformedMessageError, match="sums to"):
        decode(payload)


def test_summary_without_a_model_is_refused() -> None:
    batch = TelemetryBatch(seq=1, records=(record(model=None, version=None, summary=_summary()),))
    with pytest.raises(SummaryError, match="needs the model"):
        decode(encode(batch, sender="pi-7", sent_at=1.0))


def test_check_fits_the_profile() -> None:
    x = RNG.normal(size=(100, 4)).astype(np.float32)
    profile = profile_from_data(x, RNG.normal(size=(100, 3)), "classification")
    _summary(f=4, k=3).check_fits(profile)  # fits: no error
    with pytest.raises(SummaryError, match="features 5 != profile's 4"):
        _summary(f=5, k=3).check_fits(profile)
    with pytest.raises(SummaryError, match="classes None != profile's 3"):
        _summary(f=4, k=None).check_fits(profile)
    with pytest.raises(SummaryError, match="confidence False != profile's True"):
        _summary(f=4, k=3, conf=False).check_fits(profile)
