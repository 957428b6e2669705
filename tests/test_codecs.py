"""Tests for the update codecs (compress.codecs).

Round trips and error bounds of each codec, top-k selection and error feedback,
payload sizes against float32, the documented payload format (checked with payloads
built by hand in this file), strict decoding of hostile payloads, and spec parsing.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.codecs import (
    MAX_UPDATE_PARAMS,
    PAYLOAD_MAGIC,
    CodecSpec,
    EncodedUpdate,
    Layout,
    decode_update,
    encode_update,
    kept_entries,
    layout_of,
    max_payload_bytes,
    parse_codec,
    update_nbytes_fp32,
)
from compress.errors import CodecError, CompressError

FloatArray = npt.NDArray[np.float32]

ALL_SPECS = [
    "fp32",
    "fp16",
    "int8",
    "topk:0.05",
    "topk:0.05+int8",
    "topk:0.05+fp16",
    "topk:0.5",
    "topk:0.5+int8",
    "topk:0.5+fp16",
]
TOPK_SPECS = [s for s in ALL_SPECS if s.startswith("topk")]
BITMAP = 0xFF


def mlp_delta(seed: int = 0, scale: float = 0.01) -> dict[str, FloatArray]:
    """A plausible update of a 64-256-10 MLP: small Gaussian steps, a few large ones."""
    rng = np.random.default_rng(seed)
    shapes = {"W0": (64, 256), "b0": (256,), "W1": (256, 10), "b1": (10,)}
    delta = {}
    for name, shape in shapes.items():
        values = rng.normal(0.0, scale, shape) * rng.lognormal(0.0, 1.0, shape)
        delta[name] = values.astype(np.float32)
    return delta


def small_delta(seed: int = 0) -> dict[str, FloatArray]:
    rng = np.random.default_rng(seed)
    return {
        "W": rng.normal(0.0, 1.0, (6, 10)).astype(np.float32),
        "b": rng.normal(0.0, 1.0, (10,)).astype(np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "c": rng.normal(0.0, 1.0, (3,)).astype(np.float32),
    }


def flat(arrays: dict[str, FloatArray]) -> FloatArray:
    return np.concatenate([a.reshape(-1) for a in arrays.values()])


def encode(
    delta: dict[str, FloatArray],
    spec: str,
    seed: int = 0,
    residual: dict[str, FloatArray] | None = None,
) -> EncodedUpdate:
    return encode_update(
        delta, parse_codec(spec), rng=np.random.default_rng(seed), residual=residual
    )


def roundtrip(delta: dict[str, FloatArray], spec: str, seed: int = 0) -> dict[str, FloatArray]:
    payload = encode(delta, spec, seed).payload
    return decode_update(payload, parse_codec(spec), layout_of(delta))


def rice_bits(gaps: list[int], r: int) -> bytes:
    """Reference Golomb-Rice coder, bit by bit, as the module docstring describes."""
    rem_bits = [(g >> j) & 1 for g in gaps for j in range(r)]
    unary_bits: list[int] = []
    for g in gaps:
        unary_bits += [0] * (g >> r) + [1]
    return pack_lsb(rem_bits) + pack_lsb(unary_bits)


def pack_lsb(bits: list[int]) -> bytes:
    out = bytearray(math.ceil(len(bits) / 8))
    for i, bit in enumerate(bits):
        out[i // 8] |= bit << (i % 8)
    return bytes(out)


def topk_payload(codec_id: int, k: int, mode: int, positions: bytes, values: bytes) -> bytes:
    return bytes((PAYLOAD_MAGIC, codec_id)) + struct.pack("<IB", k, mode) + positions + values


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("fp32", CodecSpec("fp32"), "fp32"),
        ("fp16", CodecSpec("fp16"), "fp16"),
        ("int8", CodecSpec("int8"), "int8"),
        ("topk:0.01", CodecSpec("fp32", 0.01), "topk:0.01"),
        ("topk:0.01+int8", CodecSpec("int8", 0.01), "topk:0.01+int8"),
        ("topk:0.25+fp16", CodecSpec("fp16", 0.25), "topk:0.25+fp16"),
        ("topk:1", CodecSpec("fp32", 1.0), "topk:1.0"),
        ("topk:.5", CodecSpec("fp32", 0.5), "topk:0.5"),
        ("topk:1e-3+int8", CodecSpec("int8", 0.001), "topk:0.001+int8"),
        ("topk:5E-6", CodecSpec("fp32", 5e-6), "topk:5e-06"),
    ],
)
def test_parse_codec_accepts(text: str, expected: CodecSpec, canonical: str) -> None:
    spec = parse_codec(text)
    assert spec == expected
    assert str(spec) == canonical
    assert parse_codec(canonical) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "FP32",
        "fp64",
        "int4",
        " fp32",
        "fp32 ",
        "topk",
        "topk:",
        "topk:0",
        "topk:0.0",
        "topk:1.5",
        "topk:-0.1",
        "topk:+0.1",
        "topk:nan",
        "topk:inf",
        "topk:1e999",
        "topk:1e-400",
        "topk:0.1+fp32",
        "topk:0.1+int8+fp16",
        "topk:0.1+",
        "topk:0,1",
        "topk:1_0",
        "int8+topk:0.1",
        "fp16+topk:0.1",
        "topk=0.1",
        "topk:0.1" + "0" * 200,
    ],
)
def test_parse_codec_rejects(text: str) -> None:
    with pytest.raises(CodecError, match="accepted: fp32, fp16, int8, topk:D"):
        parse_codec(text)


@pytest.mark.parametrize(
    ("values", "density"),
    [("int4", None), ("fp32", 0.0), ("fp32", 1.5), ("int8", math.nan), ("fp32", True)],
)
def test_codec_spec_validates_its_fields(values: str, density: object) -> None:
    with pytest.raises(CodecError):
        CodecSpec(values, density)  # type: ignore[arg-type]


def test_codec_error_is_a_compress_error_with_a_stable_code() -> None:
    with pytest.raises(CompressError) as info:
        parse_codec("zip")
    assert isinstance(info.value, CodecError)
    assert info.value.code == "bad_update"


@pytest.mark.parametrize(
    ("spec", "total", "k"),
    [
        ("topk:0.07", 100, 7),  # 0.07 * 100 is 7.000000000000001 in binary floats
        ("topk:0.01", 19210, 193),
        ("topk:0.001", 10, 1),
        ("topk:1", 10, 10),
        ("topk:0.3", 10, 3),
        ("fp16", 10, 10),
    ],
)
def test_kept_entries_uses_the_decimal_density(spec: str, total: int, k: int) -> None:
    layout: Layout = (("x", (total,)),)
    assert kept_entries(parse_codec(spec), layout) == k


# --------------------------------------------------------------------------- layouts


def test_layout_follows_insertion_order() -> None:
    delta = {"z": np.zeros((2, 3)), "a": np.zeros(4), "m": np.zeros(())}
    assert layout_of(delta) == (("z", (2, 3)), ("a", (4,)), ("m", ()))
    assert update_nbytes_fp32(layout_of(delta)) == 4 * (6 + 4 + 1)


@pytest.mark.parametrize(
    "layout",
    [
        (("a", (2**14, 2**15)),),
        (("a", (2**27,)), ("b", (2**27 + 1,))),
        (("a", (2,)), ("a", (3,))),
        (("a", (-1,)),),
        (("a", (2.0,)),),
        (("a", (0, 2**40)),),
        ((1, (2,)),),
        [("a", (2,))],
        (("a",),),
    ],
)
def test_invalid_layouts_are_refused(layout: object) -> None:
    for spec in ("fp32", "topk:0.1+int8"):
        with pytest.raises(CodecError):
            max_payload_bytes(parse_codec(spec), layout)  # type: ignore[arg-type]
        with pytest.raises(CodecError):
            decode_update(b"", parse_codec(spec), layout)  # type: ignore[arg-type]


def test_the_size_limit_itself_is_allowed() -> None:
    layout: Layout = (("a", (MAX_UPDATE_PARAMS,)),)
    assert max_payload_bytes(parse_codec("fp16"), layout) == 2 + 2 * MAX_UPDATE_PARAMS


# --------------------------------------------------------------------------- dense codecs


def test_fp32_round_trip_is_exact() -> None:
    delta = mlp_delta()
    encoded = encode(delta, "fp32")
    assert encoded.residual is None
    assert len(encoded.payload) == 2 + 4 * flat(delta).size
    decoded = decode_update(encoded.payload, parse_codec("fp32"), layout_of(delta))
    assert list(decoded) == list(delta)
    for name, array in delta.items():
        assert decoded[name].dtype == np.float32
        np.testing.assert_array_equal(decoded[name], array)


def test_fp32_converts_other_real_dtypes() -> None:
    delta = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": np.array([0.1, -2.5])}
    decoded = roundtrip(delta, "fp32")
    np.testing.assert_array_equal(decoded["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(decoded["b"], np.array([0.1, -2.5], np.float32))


def test_fp16_error_is_within_half_precision() -> None:
    delta = mlp_delta(scale=1.0)
    decoded = roundtrip(delta, "fp16")
    for name, array in delta.items():
        error = np.abs(decoded[name] - array)
        assert (error <= np.abs(array) * 2.0**-11 + 2.0**-25).all()
    assert any((decoded[n] != delta[n]).any() for n in delta)  # it really is lossy
    assert len(encode(delta, "fp16").payload) == 2 + 2 * flat(delta).size


def test_fp16_refuses_values_outside_its_range() -> None:
    edge = {"a": np.array([65504.0, -65519.0, 1.0], np.float32)}
    decoded = roundtrip(edge, "fp16")
    np.testing.assert_array_equal(decoded["a"], [65504.0, -65504.0, 1.0])
    for bad in (65520.0, -70000.0, 1e30):
        delta = {"ok": np.ones(3, np.float32), "big": np.array([0.0, bad], np.float32)}
        with pytest.raises(CodecError, match=r"'big'.*outside the fp16 range"):
            encode(delta, "fp16")


def test_topk_fp16_refuses_kept_values_outside_its_range() -> None:
    delta = {"a": np.array([1e5, 1.0, 0.0, 0.0], np.float32)}
    with pytest.raises(CodecError, match="fp16"):
        encode(delta, "topk:0.25+fp16")
    # the big value is only in the residual when it is not kept: fine
    residual = {"a": np.array([-1e5 + 1.0, 0.0, 0.0, 5.0], np.float32)}
    encoded = encode(delta, "topk:0.25+fp16", residual=residual)
    assert encoded.residual is not None


def test_int8_error_is_at_most_one_scale_step() -> None:
    delta = mlp_delta()
    encoded = encode(delta, "int8")
    assert encoded.residual is None
    assert len(encoded.payload) == 2 + 4 * len(delta) + flat(delta).size
    decoded = decode_update(encoded.payload, parse_codec("int8"), layout_of(delta))
    for name, array in delta.items():
        scale = float(np.abs(array).max()) / 127
        assert (np.abs(decoded[name] - array) <= scale * (1 + 1e-5)).all()
        assert float(np.abs(decoded[name]).max()) <= float(np.abs(array).max()) * (1 + 1e-5)


def test_int8_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(7)
    x = rng.uniform(-1.0, 1.0, 64).astype(np.float32)
    x[0] = 1.0  # scale = 1/127; the other values fall between the steps
    delta = {"x": x}
    n = 3000
    total = np.zeros(64, np.float64)
    for seed in range(n):
        total += roundtrip(delta, "int8", seed=seed)["x"]
    scale = 1.0 / 127
    # per element the decoded value is x +- at most one step, std <= scale / 2
    assert np.abs(total / n - x).max() < 5 * (scale / 2) / math.sqrt(n)
    # round-to-nearest would be off by up to half a step on these values
    nearest = np.round(x / np.float32(scale)) * np.float32(scale)
    assert np.abs(nearest - x).max() > 20 * (scale / 2) / math.sqrt(n)


def test_int8_of_all_zero_and_tiny_tensors() -> None:
    tiny = np.float32(1e-44)
    delta = {
        "zero": np.zeros(5, np.float32),
        "tiny": np.array([tiny, -tiny, 0.0], np.float32),
    }
    decoded = roundtrip(delta, "int8")
    np.testing.assert_array_equal(decoded["zero"], 0.0)
    assert np.isfinite(decoded["tiny"]).all()
    assert (np.abs(decoded["tiny"] - delta["tiny"]) <= 2 * tiny).all()


def test_encoding_is_deterministic_given_the_rng_seed() -> None:
    delta = mlp_delta()
    for spec in ALL_SPECS:
        assert encode(delta, spec, seed=3).payload == encode(delta, spec, seed=3).payload


# --------------------------------------------------------------------------- top-k


def test_topk_keeps_exactly_k_largest_entries() -> None:
    delta = mlp_delta(1)
    total = flat(delta).size
    spec = parse_codec("topk:0.01")
    k = kept_entries(spec, layout_of(delta))
    assert k == math.ceil(0.01 * total)
    decoded = flat(roundtrip(delta, "topk:0.01"))
    kept = np.flatnonzero(decoded)
    assert kept.size == k
    magnitudes = np.abs(flat(delta))
    dropped = np.setdiff1d(np.arange(total), kept)
    assert magnitudes[kept].min() >= magnitudes[dropped].max()
    np.testing.assert_array_equal(decoded[kept], flat(delta)[kept])


def test_topk_selection_is_global_across_tensors() -> None:
    delta = {
        "small": np.full(50, 0.001, np.float32),
        "large": np.linspace(1.0, 2.0, 50, dtype=np.float32),
    }
    decoded = roundtrip(delta, "topk:0.1")
    assert not decoded["small"].any()
    np.testing.assert_array_equal(np.flatnonzero(decoded["large"]), np.arange(40, 50))


def test_topk_selects_on_delta_plus_residual() -> None:
    delta = {"a": np.array([1.0, 0.0, 0.5, 0.0], np.float32)}
    residual = {"a": np.array([0.0, -3.0, 0.0, 0.0], np.float32)}
    encoded = encode(delta, "topk:0.5", residual=residual)
    decoded = decode_update(encoded.payload, parse_codec("topk:0.5"), layout_of(delta))
    np.testing.assert_array_equal(decoded["a"], [1.0, -3.0, 0.0, 0.0])
    assert encoded.residual is not None
    np.testing.assert_array_equal(encoded.residual["a"], [0.0, 0.0, 0.5, 0.0])


@pytest.mark.parametrize("spec", [*TOPK_SPECS, "topk:0.01+int8", "topk:0.01"])
def test_residual_is_acc_minus_decoded(spec: str) -> None:
    delta = mlp_delta(2)
    residual = mlp_delta(3, scale=0.003)
    encoded = encode(delta, spec, residual=residual)
    assert encoded.residual is not None
    decoded = decode_update(encoded.payload, parse_codec(spec), layout_of(delta))
    assert list(encoded.residual) == list(delta)
    for name in delta:
        acc = delta[name] + residual[name]
        new = encoded.residual[name]
        assert new.dtype == np.float32
        assert new.shape == delta[name].shape
        # exactly what the coordinator decodes is taken out of the residual ...
        np.testing.assert_array_equal(new, acc - decoded[name])
        if parse_codec(spec).values == "fp32":
            # ... and for float32 values nothing is lost at all
            np.testing.assert_array_equal(decoded[name] + new, acc)
        else:
            ulp = np.spacing(np.maximum(np.abs(acc), np.abs(decoded[name])))
            assert (np.abs(decoded[name] + new - acc) <= ulp).all()


def test_error_feedback_delivers_the_whole_sum() -> None:
    rng = np.random.default_rng(11)
    delta = {"w": rng.normal(0.0, 1.0, 2000).astype(np.float32)}
    layout = layout_of(delta)

    def relative_errors(feedback: bool, spec: str) -> dict[int, float]:
        """After r rounds of the same delta: |sum(decoded) - r * delta| / |r * delta|."""
        residual = None
        total = np.zeros(2000, np.float64)
        errors = {}
        for done in range(1, 201):
            encoded = encode(delta, spec, seed=done, residual=residual)
            if feedback:
                residual = encoded.residual
            total += decode_update(encoded.payload, parse_codec(spec), layout)["w"]
            target = done * delta["w"].astype(np.float64)
            if residual is not None:  # the sum telescopes: delivered + left over = sent
                np.testing.assert_allclose(total + residual["w"], target, rtol=1e-5, atol=1e-4)
            errors[done] = float(np.linalg.norm(total - target) / np.linalg.norm(target))
        return errors

    for spec in ("topk:0.05", "topk:0.05+int8", "topk:0.05+fp16"):
        with_feedback = relative_errors(True, spec)
        # the residual stays bounded, so the undelivered share shrinks like 1 / rounds
        assert with_feedback[200] < 0.06
        assert with_feedback[200] < with_feedback[50] / 3
        without = relative_errors(False, spec)
        assert without[200] > 0.5


def test_topk_with_density_one_is_lossless() -> None:
    delta = mlp_delta()
    encoded = encode(delta, "topk:1")
    decoded = decode_update(encoded.payload, parse_codec("topk:1"), layout_of(delta))
    np.testing.assert_array_equal(flat(decoded), flat(delta))
    assert encoded.residual is not None
    assert not flat(encoded.residual).any()


def test_compositions_keep_the_topk_positions() -> None:
    delta = mlp_delta(4)
    plain = flat(roundtrip(delta, "topk:0.05"))
    kept = np.flatnonzero(plain)
    for spec in ("topk:0.05+int8", "topk:0.05+fp16"):
        decoded = flat(roundtrip(delta, spec))
        assert set(np.flatnonzero(decoded)) <= set(kept)
        assert not decoded[np.setdiff1d(np.arange(plain.size), kept)].any()
    fp16 = flat(roundtrip(delta, "topk:0.05+fp16"))
    assert (np.abs(fp16[kept] - plain[kept]) <= np.abs(plain[kept]) * 2.0**-11).all()
    int8 = roundtrip(delta, "topk:0.05+int8")
    plain_by_name = roundtrip(delta, "topk:0.05")
    for name, values in plain_by_name.items():
        if values.any():  # one scale per tensor over that tensor's kept values
            scale = float(np.abs(values).max()) / 127
            assert (np.abs(int8[name] - values) <= scale * (1 + 1e-5)).all()


def test_tensors_without_kept_entries_cost_no_value_bytes() -> None:
    delta = {
        "quiet": np.full(100, 1e-6, np.float32),
        "loud": np.linspace(1.0, 2.0, 100, dtype=np.float32),
        "none": np.zeros((0,), np.float32),
    }
    one = encode(delta, "topk:0.05+int8").payload  # k = 10, all in "loud"
    positions = len(encode(delta, "topk:0.05").payload) - 7 - 4 * 10
    assert len(one) == 7 + positions + 4 * 1 + 10
    assert not roundtrip(delta, "topk:0.05+int8")["quiet"].any()


def test_empty_and_zero_size_updates() -> None:
    empty: dict[str, FloatArray] = {}
    zero = {"e": np.zeros((0, 4), np.float32)}
    for delta in (empty, zero):
        for spec in ALL_SPECS:
            encoded = encode(delta, spec)
            decoded = decode_update(encoded.payload, parse_codec(spec), layout_of(delta))
            assert {n: a.shape for n, a in decoded.items()} == {
                n: a.shape for n, a in delta.items()
            }


# --------------------------------------------------------------------------- sizes


def test_payload_sizes_for_the_mlp() -> None:
    delta = mlp_delta()
    layout = layout_of(delta)
    sizes = {spec: len(encode(delta, spec).payload) for spec in [*ALL_SPECS, "topk:0.01+int8"]}
    fp32 = sizes["fp32"]
    assert fp32 == 2 + update_nbytes_fp32(layout)
    assert fp32 / sizes["topk:0.01+int8"] >= 30
    assert sizes["fp16"] < fp32 / 1.9
    assert sizes["int8"] < fp32 / 3.9
    for spec, size in sizes.items():
        assert size <= max_payload_bytes(parse_codec(spec), layout)


@pytest.mark.parametrize("density", [0.001, 0.01, 0.05])
def test_sparse_positions_are_rice_coded_compactly(density: float) -> None:
    delta = mlp_delta(5)
    spec = f"topk:{density}"
    payload = encode(delta, spec).payload
    assert payload[6] != BITMAP
    k = kept_entries(parse_codec(spec), layout_of(delta))
    position_bytes = len(payload) - 7 - 4 * k
    assert position_bytes / k < 1.5


@pytest.mark.parametrize("density", [0.5, 0.7, 0.9])
def test_dense_positions_use_the_bitmap(density: float) -> None:
    delta = mlp_delta(5)
    spec = f"topk:{density}"
    payload = encode(delta, spec).payload
    assert payload[6] == BITMAP
    k = kept_entries(parse_codec(spec), layout_of(delta))
    assert len(payload) - 7 - 4 * k == math.ceil(flat(delta).size / 8)


def test_rice_payload_matches_the_documented_format() -> None:
    values = np.zeros(1000, np.float32)
    kept = [3, 40, 41, 300, 999]
    values[kept] = [1.0, -2.0, 3.0, -4.0, 5.0]
    delta = {"a": values[:600], "b": values[600:]}
    payload = encode(delta, "topk:0.005").payload
    r = payload[6]
    gaps = [3, 36, 0, 258, 698]
    expected = topk_payload(4, 5, r, rice_bits(gaps, r), values[kept].astype("<f4").tobytes())
    assert payload == expected


def test_bitmap_payload_matches_the_documented_format() -> None:
    delta = {"a": np.array([0.0, 5.0, 0.0, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0], np.float32)}
    payload = encode(delta, "topk:0.4+fp16").payload
    bitmap = pack_lsb([0, 1, 0, 1, 1, 0, 0, 0, 0, 1])
    values = np.array([5.0, -1.0, 2.0, 3.0], "<f2").tobytes()
    assert payload == topk_payload(5, 4, BITMAP, bitmap, values)


def test_large_update_smoke() -> None:
    rng = np.random.default_rng(0)
    delta = {
        "big": rng.normal(0.0, 1.0, (1000, 1000)).astype(np.float32),
        "bias": rng.normal(0.0, 1.0, 1000).astype(np.float32),
    }
    layout = layout_of(delta)
    for spec in ("topk:0.01+int8", "topk:0.3", "int8"):
        encoded = encode(delta, spec)
        decoded = decode_update(encoded.payload, parse_codec(spec), layout)
        assert decoded["big"].shape == (1000, 1000)
        assert np.isfinite(decoded["big"]).all()
    assert len(encode(delta, "topk:0.01+int8").payload) < 1_001_000 * 4 / 100


# --------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_values(bad: float) -> None:
    delta = {"a": np.array([1.0, bad], np.float32)}
    for spec in ALL_SPECS:
        with pytest.raises(CodecError, match="'a'"):
            encode(delta, spec)


def test_encode_refuses_what_float32_cannot_hold_and_non_numbers() -> None:
    with pytest.raises(CodecError, match="NaN or infinity"):
        encode({"a": np.array([1e300])}, "fp32")
    for bad in (np.array([1 + 2j]), np.array(["x"]), np.array([None], dtype=object)):
        with pytest.raises(CodecError, match="real numbers"):
            encode({"a": bad}, "fp32")
    with pytest.raises(CodecError, match="not an array"):
        encode({"a": [[1.0], [1.0, 2.0]]}, "fp32")  # type: ignore[dict-item]
    with pytest.raises(CodecError, match="strings"):
        encode({1: np.zeros(2)}, "fp32")  # type: ignore[dict-item]


def test_encode_checks_the_residual() -> None:
    delta = small_delta()
    with pytest.raises(CodecError, match="no error feedback"):
        encode(delta, "int8", residual=small_delta(1))
    with pytest.raises(CodecError, match="do not match"):
        encode(delta, "topk:0.1", residual={"W": delta["W"]})
    wrong_shape = dict(small_delta(1), b=np.zeros(11, np.float32))
    with pytest.raises(CodecError, match="shape"):
        encode(delta, "topk:0.1", residual=wrong_shape)
    with pytest.raises(CodecError, match="NaN or infinity"):
        encode(delta, "topk:0.1", residual=dict(small_delta(1), c=np.full(3, np.nan)))
    huge = {"a": np.array([3e38], np.float32)}
    with pytest.raises(CodecError, match="overflows"):
        encode(huge, "topk:1", residual=huge)
    # the residual's order does not matter, only its names and shapes
    shuffled = dict(reversed(small_delta(1).items()))
    assert encode(delta, "topk:0.1", residual=shuffled).payload == (
        encode(delta, "topk:0.1", residual=small_delta(1)).payload
    )


# --------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize(
    ("encoded_with", "decoded_as", "match"),
    [
        ("int8", "fp32", "encoded with int8"),
        ("fp16", "int8", "encoded with fp16"),
        ("topk:0.05+int8", "topk:0.05", "encoded with topk:D\\+int8"),
        ("topk:0.05", "topk:0.05+fp16", "encoded with topk:D, expected"),
        ("topk:0.05", "topk:0.5", "entries"),
        ("fp32", "topk:0.5", "encoded with fp32"),
    ],
)
def test_decode_refuses_another_codec(encoded_with: str, decoded_as: str, match: str) -> None:
    delta = small_delta()
    payload = encode(delta, encoded_with).payload
    with pytest.raises(CodecError, match=match):
        decode_update(payload, parse_codec(decoded_as), layout_of(delta))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_decode_refuses_truncated_and_padded_payloads(spec: str) -> None:
    delta = small_delta()
    layout = layout_of(delta)
    payload = encode(delta, spec).payload
    decode_update(payload, parse_codec(spec), layout)
    for end in range(len(payload)):
        with pytest.raises(CodecError):
            decode_update(payload[:end], parse_codec(spec), layout)
    for extra in (b"\x00", b"\x01\x02\x03"):
        with pytest.raises(CodecError, match=r"trailing|more than"):
            decode_update(payload + extra, parse_codec(spec), layout)


def test_decode_refuses_a_wrong_layout() -> None:
    delta = small_delta()
    payload = encode(delta, "fp32").payload
    smaller = (("W", (6, 10)), ("b", (9,)), ("c", (3,)))
    with pytest.raises(CodecError):
        decode_update(payload, parse_codec("fp32"), smaller)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_decode_refuses_a_mutated_header(spec: str) -> None:
    delta = small_delta()
    layout = layout_of(delta)
    payload = encode(delta, spec).payload
    offsets = [0, 1, 2, 3, 4, 5] if spec.startswith("topk") else [0, 1]
    for offset in offsets:
        for flip in (0x01, 0x80, 0xFF):
            mutated = bytearray(payload)
            mutated[offset] ^= flip
            with pytest.raises(CodecError):
                decode_update(bytes(mutated), parse_codec(spec), layout)


def test_decode_refuses_out_of_range_positions() -> None:
    layout: Layout = (("a", (100,)),)
    spec = parse_codec("topk:0.01")  # k = 1
    one = np.float32(2.5).tobytes()
    # the last position is fine ...
    good = topk_payload(4, 1, 7, rice_bits([99], 7), one)
    assert float(decode_update(good, spec, layout)["a"][99]) == 2.5
    # ... one past the end is not, nor far past it
    for gap in (100, 150):
        bad = topk_payload(4, 1, 7, rice_bits([gap], 7), one)
        with pytest.raises(CodecError, match="out of range"):
            decode_update(bad, spec, layout)
    # a bitmap bit beyond the 100 positions (in the last byte's padding)
    bitmap = pack_lsb([0] * 103 + [1])
    with pytest.raises(CodecError, match="out of range"):
        decode_update(topk_payload(4, 1, BITMAP, bitmap, one), spec, layout)
    # two set bits where one is expected
    bitmap = pack_lsb([1, 1] + [0] * 98)
    with pytest.raises(CodecError, match="marks 2"):
        decode_update(topk_payload(4, 1, BITMAP, bitmap, one), spec, layout)


def test_decode_refuses_bad_rice_parameters_and_padding() -> None:
    layout: Layout = (("a", (100,)),)
    spec = parse_codec("topk:0.01")
    one = np.float32(1.0).tobytes()
    assert decode_update(topk_payload(4, 1, 7, rice_bits([5], 7), one), spec, layout)
    for r in (8, 30, 31, 100, 254):  # 100 params need at most 7 bits
        with pytest.raises(CodecError):
            decode_update(topk_payload(4, 1, r, rice_bits([5], 7), one), spec, layout)
    with pytest.raises(CodecError, match="padding"):
        decode_update(topk_payload(4, 1, 7, b"\x85\x01", one), spec, layout)
    with pytest.raises(CodecError, match="padding"):
        decode_update(topk_payload(4, 1, 7, b"\x05\x03", one), spec, layout)
    with pytest.raises(CodecError):  # quotient never terminated
        decode_update(topk_payload(4, 1, 0, b"\x00" * 12, one), spec, layout)


@pytest.mark.parametrize(
    ("spec", "offset", "value", "match"),
    [
        ("fp32", 2, np.float32(np.nan).tobytes(), "NaN or infinity"),
        ("fp32", 6, np.float32(np.inf).tobytes(), "NaN or infinity"),
        ("fp16", 2, np.float16(np.inf).tobytes(), "NaN or infinity"),
        ("int8", 2, np.float32(np.nan).tobytes(), "scales"),
        ("int8", 2, np.float32(-1.0).tobytes(), "scales"),
        ("int8", 2, np.float32(3e38).tobytes(), "scale too large"),
        ("int8", 2 + 4 * 3, b"\x80", "-128"),
    ],
)
def test_decode_refuses_bad_values(spec: str, offset: int, value: bytes, match: str) -> None:
    delta = small_delta()
    payload = bytearray(encode(delta, spec).payload)
    payload[offset : offset + len(value)] = value
    with pytest.raises(CodecError, match=match):
        decode_update(bytes(payload), parse_codec(spec), layout_of(delta))


def test_decode_refuses_non_bytes_and_oversized_payloads() -> None:
    layout = layout_of(small_delta())
    with pytest.raises(CodecError, match="bytes"):
        decode_update("abc", parse_codec("fp32"), layout)  # type: ignore[arg-type]
    limit = max_payload_bytes(parse_codec("topk:0.05"), layout)
    header = encode(small_delta(), "topk:0.05").payload[:7]
    with pytest.raises(CodecError, match="more than"):
        decode_update(header + bytes(limit - 6), parse_codec("topk:0.05"), layout)
    assert decode_update(
        bytearray(encode(small_delta(), "fp32").payload), parse_codec("fp32"), layout
    )


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ_LAYOUT = layout_of(small_delta())
PAYLOADS = {spec: encode(small_delta(), spec).payload for spec in ALL_SPECS}


def check_decodes_safely(payload: bytes, spec: str) -> None:
    try:
        decoded = decode_update(payload, parse_codec(spec), FUZZ_LAYOUT)
    except CodecError:
        return
    assert list(decoded) == [name for name, _ in FUZZ_LAYOUT]
    for name, shape in FUZZ_LAYOUT:
        assert decoded[name].shape == shape
        assert decoded[name].dtype == np.float32
        assert np.isfinite(decoded[name]).all()


@FUZZ
@given(st.sampled_from(ALL_SPECS), st.binary(max_size=600))
def test_fuzz_random_bytes(spec: str, data: bytes) -> None:
    check_decodes_safely(data, spec)
    header = PAYLOADS[spec][: 7 if spec.startswith("topk") else 2]
    check_decodes_safely(header + data, spec)


@FUZZ
@given(
    st.sampled_from(ALL_SPECS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(-8, 8),
)
def test_fuzz_mutated_payloads(spec: str, edits: list[tuple[int, int]], resize: int) -> None:
    mutated = bytearray(PAYLOADS[spec])
    for where, byte in edits:
        mutated[where % len(mutated)] = byte
    if resize < 0:
        del mutated[resize:]
    else:
        mutated += bytes(resize)
    check_decodes_safely(bytes(mutated), spec)


def test_no_single_byte_change_to_a_header_goes_unnoticed() -> None:
    for spec, payload in PAYLOADS.items():
        for value in range(256):
            if value != payload[1]:
                with pytest.raises(CodecError):
                    decode_update(
                        payload[:1] + bytes([value]) + payload[2:], parse_codec(spec), FUZZ_LAYOUT
                    )
