"""coordinator.federated.update_check: every check an update goes through before aggregation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from compress.codecs import (
    CodecSpec,
    Layout,
    decode_update,
    encode_update,
    layout_of,
    max_payload_bytes,
    parse_codec,
)
from coordinator.errors import UpdateRejectedError
from coordinator.federated import update_check
from coordinator.federated.update_check import (
    MAX_EXAMPLES,
    REJECT_REASONS,
    UPDATE_ARRAY,
    UpdateCheck,
    check_update,
)
from edge_agent.protocol import UpdateReport

TASK_ID = "0123456789abcdef" * 2

Arrays = dict[str, npt.NDArray[Any]]


def global_weights() -> dict[str, npt.NDArray[np.float32]]:
    """A small mlp-like layout whose names are deliberately not in sorted order."""
    return {
        "W0": np.zeros((6, 4), np.float32),
        "b0": np.zeros(4, np.float32),
        "W1": np.zeros((4, 3), np.float32),
        "b1": np.zeros(3, np.float32),
    }


LAYOUT: Layout = layout_of(global_weights())


def make_delta(seed: int = 0, scale: float = 0.1) -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in LAYOUT}


def report(codec: str = "fp32", num_examples: int = 32) -> UpdateReport:
    return UpdateReport(
        round_id="round-1",
        task_id=TASK_ID,
        num_examples=num_examples,
        codec=codec,
        arrays={},
    )


def as_array(payload: bytes) -> npt.NDArray[np.uint8]:
    return np.frombuffer(payload, dtype=np.uint8).copy()


def encode(
    delta: Mapping[str, npt.ArrayLike], codec: str, seed: int = 0
) -> tuple[bytes, dict[str, npt.NDArray[np.float32]] | None]:
    encoded = encode_update(delta, parse_codec(codec), rng=np.random.default_rng(seed))
    return encoded.payload, encoded.residual


def check_of(codec: str, max_norm: float | None = None) -> UpdateCheck:
    if max_norm is None:
        return UpdateCheck(codec=parse_codec(codec), layout=LAYOUT)
    return UpdateCheck(codec=parse_codec(codec), layout=LAYOUT, max_norm=max_norm)


def rejection(
    arrays: Mapping[str, npt.NDArray[Any]],
    *,
    codec: str = "fp32",
    report_codec: str | None = None,
    num_examples: int = 32,
    max_norm: float | None = None,
) -> UpdateRejectedError:
    """The error ``check_update`` raises for this update (fails if it accepts it)."""
    with pytest.raises(UpdateRejectedError) as info:
        check_update(report(report_codec or codec, num_examples), arrays, check_of(codec, max_norm))
    assert info.value.reason in REJECT_REASONS
    assert str(info.value).startswith(f"{info.value.reason}: ")
    return info.value


def fp32_payload(values: npt.ArrayLike) -> bytes:
    """An fp32 payload by hand: magic, codec id 1, then little-endian float32 values."""
    return bytes((0xC1, 0x01)) + np.asarray(values, dtype="<f4").tobytes()


def norm(delta: Mapping[str, npt.NDArray[np.float32]]) -> float:
    return float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values())))


# --------------------------------------------------------------------------- accepted


def test_fp32_update_round_trips_exactly() -> None:
    delta = make_delta()
    payload, _ = encode(delta, "fp32")
    decoded = check_update(report("fp32"), {UPDATE_ARRAY: as_array(payload)}, check_of("fp32"))
    assert list(decoded) == [name for name, _ in LAYOUT]
    for name, shape in LAYOUT:
        assert decoded[name].dtype == np.float32
        assert decoded[name].shape == shape
        np.testing.assert_array_equal(decoded[name], delta[name])


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_dense_lossy_codecs_decode_close_to_the_delta(codec: str) -> None:
    delta = make_delta(seed=3)
    payload, _ = encode(delta, codec)
    decoded = check_update(report(codec), {UPDATE_ARRAY: as_array(payload)}, check_of(codec))
    for name, value in delta.items():
        peak = float(np.max(np.abs(value)))
        np.testing.assert_allclose(decoded[name], value, atol=peak / 127 + 1e-6)


def test_topk_int8_update_is_the_kept_part_within_quantization_error() -> None:
    codec = "topk:0.25+int8"
    delta = make_delta(seed=5)
    payload, residual = encode(delta, codec)
    assert residual is not None
    decoded = check_update(report(codec), {UPDATE_ARRAY: as_array(payload)}, check_of(codec))
    # exactly what the codec decodes, and decoded + residual gives the delta back
    expected = decode_update(payload, parse_codec(codec), LAYOUT)
    total = sum(int(np.prod(shape)) for _, shape in LAYOUT)
    kept = sum(int(np.count_nonzero(v)) for v in decoded.values())
    assert 0 < kept <= int(np.ceil(0.25 * total))
    for name, value in delta.items():
        np.testing.assert_array_equal(decoded[name], expected[name])
        np.testing.assert_allclose(decoded[name] + residual[name], value, atol=1e-6)
        sent = decoded[name] != 0
        peak = float(np.max(np.abs(value)))
        np.testing.assert_allclose(decoded[name][sent], value[sent], atol=peak / 127 + 1e-6)


def test_topk_keeps_the_largest_entries() -> None:
    codec = "topk:0.1"
    delta = make_delta(seed=9)
    payload, _ = encode(delta, codec)
    decoded = check_update(report(codec), {UPDATE_ARRAY: as_array(payload)}, check_of(codec))
    flat_delta = np.concatenate([delta[name].ravel() for name, _ in LAYOUT])
    flat_decoded = np.concatenate([decoded[name].ravel() for name, _ in LAYOUT])
    k = int(np.ceil(0.1 * flat_delta.size))
    largest = np.sort(np.argsort(np.abs(flat_delta))[-k:])
    np.testing.assert_array_equal(np.flatnonzero(flat_decoded), largest)
    np.testing.assert_array_equal(flat_decoded[largest], flat_delta[largest])


def test_update_just_under_max_norm_passes_and_just_over_is_too_large() -> None:
    delta = make_delta(seed=1, scale=2.0)
    payload = as_array(encode(delta, "fp32")[0])
    size = norm(delta)
    accepted = check_update(
        report(), {UPDATE_ARRAY: payload}, check_of("fp32", max_norm=size * (1 + 1e-9))
    )
    assert norm(accepted) == pytest.approx(size)
    assert rejection({UPDATE_ARRAY: payload}, max_norm=size * (1 - 1e-6)).reason == "too_large"


def test_update_norm_equal_to_max_norm_passes() -> None:
    delta = make_delta(seed=4)
    payload = as_array(encode(delta, "fp32")[0])
    check_update(report(), {UPDATE_ARRAY: payload}, check_of("fp32", max_norm=norm(delta)))


def test_zero_update_passes_with_any_bound() -> None:
    payload = as_array(fp32_payload(np.zeros(sum(int(np.prod(s)) for _, s in LAYOUT))))
    decoded = check_update(report(), {UPDATE_ARRAY: payload}, check_of("fp32", max_norm=0.0))
    assert all(not value.any() for value in decoded.values())


@pytest.mark.parametrize("num_examples", [1, MAX_EXAMPLES])
def test_example_count_bounds_are_inclusive(num_examples: int) -> None:
    payload = as_array(encode(make_delta(), "fp32")[0])
    check_update(report(num_examples=num_examples), {UPDATE_ARRAY: payload}, check_of("fp32"))


def test_default_max_norm_is_the_module_default() -> None:
    assert check_of("fp32").max_norm == update_check.DEFAULT_MAX_UPDATE_NORM
    big = make_delta(scale=1.0)
    big["W0"][0, 0] = np.float32(update_check.DEFAULT_MAX_UPDATE_NORM * 2)
    payload = as_array(encode(big, "fp32")[0])
    assert rejection({UPDATE_ARRAY: payload}).reason == "too_large"


# --------------------------------------------------------------------------- rejected


def valid_arrays(codec: str = "fp32") -> Arrays:
    return {UPDATE_ARRAY: as_array(encode(make_delta(), codec)[0])}


@pytest.mark.parametrize(
    ("task_codec", "report_codec"),
    [
        ("fp32", "int8"),
        ("int8", "fp32"),
        ("topk:0.1", "topk:0.2"),
        ("topk:0.1+int8", "topk:0.1"),
        ("topk:0.1", "topk:0.10"),  # the canonical spelling is what the task sent
    ],
)
def test_wrong_codec(task_codec: str, report_codec: str) -> None:
    error = rejection(valid_arrays(task_codec), codec=task_codec, report_codec=report_codec)
    assert error.reason == "wrong_codec"
    assert str(parse_codec(task_codec)) in str(error)


def test_wrong_codec_is_checked_before_anything_else() -> None:
    error = rejection({}, report_codec="int8", num_examples=0)
    assert error.reason == "wrong_codec"


@pytest.mark.parametrize("num_examples", [0, -1, MAX_EXAMPLES + 1, 10**18])
def test_bad_example_count(num_examples: int) -> None:
    error = rejection(valid_arrays(), num_examples=num_examples)
    assert error.reason == "bad_examples"
    assert str(num_examples) in str(error)


@pytest.mark.parametrize(
    "arrays",
    [
        pytest.param({}, id="no-arrays"),
        pytest.param({"delta": np.zeros(4, np.uint8)}, id="wrong-name"),
        pytest.param(
            {UPDATE_ARRAY: np.zeros(4, np.uint8), "extra": np.zeros(1, np.uint8)},
            id="extra-array",
        ),
    ],
)
def test_malformed_array_set(arrays: Arrays) -> None:
    assert rejection(arrays).reason == "malformed"


def test_malformed_when_the_payload_is_not_uint8() -> None:
    payload = as_array(encode(make_delta(), "fp32")[0])
    for dtype in (np.int8, np.float32, np.uint16):
        error = rejection({UPDATE_ARRAY: payload.astype(dtype)})
        assert error.reason == "malformed"
        assert np.dtype(dtype).name in str(error)


def test_malformed_when_the_payload_is_not_1d() -> None:
    payload = as_array(encode(make_delta(), "fp32")[0])
    assert rejection({UPDATE_ARRAY: payload.reshape(2, -1)}).reason == "malformed"
    assert rejection({UPDATE_ARRAY: np.array(7, np.uint8)}).reason == "malformed"


@pytest.mark.parametrize("cut", [1, 4, 20])
def test_truncated_payload_is_malformed(cut: int) -> None:
    payload = encode(make_delta(), "fp32")[0]
    assert rejection({UPDATE_ARRAY: as_array(payload[:-cut])}).reason == "malformed"


@pytest.mark.parametrize("codec", ["topk:0.25", "topk:0.25+int8", "int8"])
def test_truncated_payload_of_other_codecs_is_malformed(codec: str) -> None:
    payload = encode(make_delta(), codec)[0]
    arrays = {UPDATE_ARRAY: as_array(payload[:-1])}
    assert rejection(arrays, codec=codec).reason == "malformed"


def test_empty_payload_is_malformed() -> None:
    assert rejection({UPDATE_ARRAY: np.zeros(0, np.uint8)}).reason == "malformed"


@pytest.mark.parametrize("other", ["fp16", "int8", "topk:0.1", "topk:0.1+int8"])
def test_payload_of_another_codec_is_malformed(other: str) -> None:
    """A payload the device encoded with another codec than it claims (and the task set)."""
    payload = encode(make_delta(), other)[0]
    assert len(payload) <= max_payload_bytes(parse_codec("fp32"), LAYOUT)
    assert rejection({UPDATE_ARRAY: as_array(payload)}).reason == "malformed"


def test_fp32_payload_against_an_int8_task_is_rejected() -> None:
    payload = encode(make_delta(), "fp32")[0]
    error = rejection({UPDATE_ARRAY: as_array(payload)}, codec="int8")
    # larger than any int8 payload of this layout: refused before decoding
    assert error.reason == "oversized"


def test_bad_magic_is_malformed() -> None:
    payload = bytearray(encode(make_delta(), "fp32")[0])
    payload[0] ^= 0xFF
    assert rejection({UPDATE_ARRAY: as_array(bytes(payload))}).reason == "malformed"


def test_payload_for_another_layout_is_malformed() -> None:
    """Encoded against a smaller model: the decoder finds it too short."""
    payload = encode({"W0": np.ones((6, 4), np.float32)}, "fp32")[0]
    assert rejection({UPDATE_ARRAY: as_array(payload)}).reason == "malformed"


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "topk:0.25", "topk:0.25+int8"])
def test_payload_one_byte_over_the_limit_is_oversized(codec: str) -> None:
    limit = max_payload_bytes(parse_codec(codec), LAYOUT)
    payload = encode(make_delta(), codec)[0]
    padded = payload + bytes(limit + 1 - len(payload))
    error = rejection({UPDATE_ARRAY: as_array(padded)}, codec=codec)
    assert error.reason == "oversized"
    assert str(limit) in str(error)


def test_payload_at_the_limit_with_trailing_bytes_is_malformed() -> None:
    """Top-k payloads with Rice positions are shorter than the bound: padding them up to
    the bound is not oversized, but the decoder refuses the trailing bytes."""
    codec = "topk:0.05"
    payload = encode(make_delta(), codec)[0]
    limit = max_payload_bytes(parse_codec(codec), LAYOUT)
    assert len(payload) < limit
    padded = payload + bytes(limit - len(payload))
    assert rejection({UPDATE_ARRAY: as_array(padded)}, codec=codec).reason == "malformed"


def test_huge_payload_is_oversized_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_args: object) -> None:
        raise AssertionError("an oversized payload must not be decoded")

    monkeypatch.setattr(update_check, "decode_update", never)
    huge = np.zeros(10 * max_payload_bytes(parse_codec("fp32"), LAYOUT), np.uint8)
    assert rejection({UPDATE_ARRAY: huge}).reason == "oversized"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_fp32_payload(bad: float) -> None:
    count = sum(int(np.prod(shape)) for _, shape in LAYOUT)
    values = np.full(count, 0.01, np.float32)
    values[count // 2] = bad
    payload = fp32_payload(values)
    assert len(payload) == max_payload_bytes(parse_codec("fp32"), LAYOUT)
    error = rejection({UPDATE_ARRAY: as_array(payload)})
    assert error.reason == "non_finite"


def test_nan_bytes_in_an_encoded_fp32_payload() -> None:
    payload = bytearray(encode(make_delta(), "fp32")[0])
    payload[2:6] = b"\x00\x00\xc0\x7f"  # the first value becomes a quiet NaN
    assert rejection({UPDATE_ARRAY: as_array(bytes(payload))}).reason == "non_finite"


def test_non_finite_fp16_payload() -> None:
    payload = bytearray(encode(make_delta(), "fp16")[0])
    payload[-2:] = np.array([np.inf], "<f2").tobytes()
    error = rejection({UPDATE_ARRAY: as_array(bytes(payload))}, codec="fp16")
    assert error.reason == "non_finite"


def test_non_finite_topk_values() -> None:
    codec = "topk:0.25"
    payload = bytearray(encode(make_delta(), codec)[0])
    payload[-4:] = np.array([np.nan], "<f4").tobytes()  # the last kept value
    error = rejection({UPDATE_ARRAY: as_array(bytes(payload))}, codec=codec)
    assert error.reason == "non_finite"


def test_non_finite_int8_scale_is_refused() -> None:
    """An int8 payload whose first scale is NaN (scales follow the 2-byte header)."""
    payload = bytearray(encode(make_delta(), "int8")[0])
    payload[2:6] = np.array([np.nan], "<f4").tobytes()
    error = rejection({UPDATE_ARRAY: as_array(bytes(payload))}, codec="int8")
    assert error.reason in {"non_finite", "malformed"}


def test_non_finite_decoded_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_update's own finiteness check (defence in depth behind the decoder)."""
    delta = make_delta()
    delta["b1"][1] = np.nan

    def decode(*_args: object) -> dict[str, npt.NDArray[np.float32]]:
        return delta

    monkeypatch.setattr(update_check, "decode_update", decode)
    payload = as_array(encode(make_delta(), "fp32")[0])
    assert rejection({UPDATE_ARRAY: payload}).reason == "non_finite"
    delta["b1"][1] = np.inf
    assert rejection({UPDATE_ARRAY: payload}).reason == "non_finite"


@pytest.mark.parametrize("broken", ["missing", "reshaped"])
def test_decoded_shapes_are_checked_against_the_layout(
    monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """The shape check behind the decoder: a decoded tensor missing or mis-shaped."""
    delta = make_delta()
    if broken == "missing":
        del delta["W1"]
    else:
        delta["W1"] = delta["W1"].reshape(3, 4)

    def decode(*_args: object) -> dict[str, npt.NDArray[np.float32]]:
        return delta

    monkeypatch.setattr(update_check, "decode_update", decode)
    payload = as_array(encode(make_delta(), "fp32")[0])
    error = rejection({UPDATE_ARRAY: payload})
    assert error.reason == "wrong_shape"
    assert "W1" in str(error)


def test_too_large_names_the_norm() -> None:
    delta = make_delta(scale=1.0)
    payload = as_array(encode(delta, "fp32")[0])
    error = rejection({UPDATE_ARRAY: payload}, max_norm=norm(delta) / 2)
    assert error.reason == "too_large"
    assert f"{norm(delta):.3g}" in str(error)


def test_norm_does_not_overflow_for_float32_extremes() -> None:
    """Squares of float32 values near the maximum are summed in float64."""
    count = sum(int(np.prod(shape)) for _, shape in LAYOUT)
    values = np.full(count, np.finfo(np.float32).max / 2, np.float32)
    payload = as_array(fp32_payload(values))
    assert rejection({UPDATE_ARRAY: payload}).reason == "too_large"
    accepted = check_update(report(), {UPDATE_ARRAY: payload}, check_of("fp32", max_norm=1e300))
    assert np.isfinite(norm(accepted))


def test_check_is_a_frozen_value() -> None:
    check = UpdateCheck(codec=CodecSpec(), layout=LAYOUT)
    with pytest.raises(AttributeError):
        check.max_norm = 1.0  # type: ignore[misc]
