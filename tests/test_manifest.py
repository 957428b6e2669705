"""The manifest: canonical encoding, strict parsing, forward compatibility."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from typing import Any

import numpy as np
import pytest

from compress.errors import ManifestError
from compress.manifest import SCHEMA_VERSION, Manifest, ReferenceTensor, parse_time
from tests.conftest import NOW, make_manifest


def _mutated(manifest: Manifest, **changes: Any) -> bytes:
    obj = manifest.to_dict()
    obj.update(changes)
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def test_round_trip_is_identity(manifest: Manifest) -> None:
    data = manifest.to_bytes()
    parsed = Manifest.from_bytes(data)
    assert parsed == manifest
    assert parsed.to_bytes() == data


def test_encoding_is_canonical(manifest: Manifest) -> None:
    data = manifest.to_bytes()
    assert b" " not in data.replace(b'"family":"mlp"', b"")
    obj = json.loads(data)
    assert list(obj) == sorted(obj)


def test_non_canonical_spelling_is_rejected(manifest: Manifest) -> None:
    pretty = json.dumps(manifest.to_dict(), indent=1, sort_keys=True).encode()
    with pytest.raises(ManifestError, match="canonical"):
        Manifest.from_bytes(pretty)
    unsorted = json.dumps(manifest.to_dict(), separators=(",", ":")).encode()
    if unsorted != manifest.to_bytes():
        with pytest.raises(ManifestError, match="canonical"):
            Manifest.from_bytes(unsorted)


def test_unknown_fields_are_kept_for_newer_writers(manifest: Manifest) -> None:
    data = _mutated(manifest, zz_future_field={"x": [1, 2]})
    parsed = Manifest.from_bytes(data)
    assert parsed.extra == {"zz_future_field": {"x": [1, 2]}}
    assert parsed.to_bytes() == data


def test_newer_schema_is_rejected(manifest: Manifest) -> None:
    with pytest.raises(ManifestError, match="schema"):
        Manifest.from_bytes(_mutated(manifest, schema=SCHEMA_VERSION + 1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "Digits"),
        ("name", ""),
        ("name", "a" * 65),
        ("version", 0),
        ("version", True),
        ("version", 1.5),
        ("version", "3"),
        ("sha256", "ab" * 31),
        ("sha256", "AB" * 32),
        ("length", 0),
        ("length", -1),
        ("format", "pickle"),
        ("quantization", "int4"),
        ("created", "2026-11-22 12:00:00"),
        ("expires", "2026-13-01T00:00:00Z"),
        ("inputs", []),
        ("inputs", [{"name": "x", "shape": [0], "dtype": "float32"}]),
        ("inputs", [{"name": "x", "shape": [1], "dtype": "object"}]),
        ("inputs", [{"name": "bad name", "shape": [1], "dtype": "float32"}]),
        ("outputs", "probabilities"),
        ("hardware_tags", ["ok", "not ok"]),
        ("metadata", {"k": 1}),
        ("health_check", {"inputs": {}, "outputs": {}, "rtol": 0, "atol": 0, "max_latency_ms": 1}),
    ],
)
def test_invalid_fields_are_rejected(manifest: Manifest, field: str, value: object) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(_mutated(manifest, **{field: value}))


def test_missing_field_is_rejected(manifest: Manifest) -> None:
    obj = manifest.to_dict()
    del obj["sha256"]
    with pytest.raises(ManifestError, match="sha256: missing"):
        Manifest.from_dict(obj)


def test_expiry_must_follow_creation() -> None:
    with pytest.raises(ManifestError, match="expires before"):
        make_manifest(created=NOW, expires=NOW - timedelta(seconds=1))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"a":1,"a":2}',
        b'{"x":NaN}',
        b'{"x":Infinity}',
        b"\xff\xfe",
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a":' * 100 + b"1" + b"}" * 100,
    ],
)
def test_malformed_json_is_a_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(data)


def test_oversized_manifest_is_rejected_before_parsing() -> None:
    with pytest.raises(ManifestError, match="max is"):
        Manifest.from_bytes(b" " * (1024 * 1024 + 1))


def test_reference_tensors_survive_float32_exactly() -> None:
    values = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    tensor = ReferenceTensor.from_array(values)
    np.testing.assert_array_equal(tensor.array(), values)
    assert tensor.array().dtype == np.float32
    manifest = make_manifest(health_check=None, metadata={})
    assert manifest.health_check is None


def test_reference_tensor_rejects_non_finite_and_unsupported() -> None:
    with pytest.raises(ManifestError):
        ReferenceTensor.from_array(np.array([np.nan], dtype=np.float32))
    with pytest.raises(ManifestError):
        ReferenceTensor.from_array(np.array(["a"]))


def test_reference_values_must_fill_the_shape(manifest: Manifest) -> None:
    obj = manifest.to_dict()
    obj["health_check"]["inputs"]["input"]["values"].pop()
    with pytest.raises(ManifestError, match="do not fill"):
        Manifest.from_dict(obj)


def test_times_are_utc_whole_seconds() -> None:
    assert parse_time("2026-11-22T12:00:00Z") == NOW
    with pytest.raises(ManifestError):
        parse_time("2026-11-22T12:00:00+00:00")


def test_summary_names_the_model(manifest: Manifest) -> None:
    assert manifest.summary().startswith("digits v3 (onnx, int8-dynamic")


def test_constructor_normalises_to_the_one_canonical_form() -> None:
    base = make_manifest()
    assert base.health_check is not None
    loose = make_manifest(
        hardware_tags=("arm64", "arm64", "fp16+int8"),
        health_check=dataclasses.replace(base.health_check, rtol=1, atol=0, max_latency_ms=50),
    )
    parsed = Manifest.from_bytes(loose.to_bytes())
    assert parsed.hardware_tags == ("arm64", "fp16+int8")
    assert parsed.health_check is not None
    assert parsed.health_check.rtol == 1.0
    assert b'"rtol":1.0' in loose.to_bytes()


@pytest.mark.parametrize(
    ("dtype", "value", "message"),
    [
        ("float32", 1, "expected a float"),
        ("float32", True, "expected a float"),
        ("int8", 300, "does not fit int8"),
        ("int8", 1.0, "expected a int"),
        ("uint8", -1, "does not fit uint8"),
        ("bool", 1, "expected a bool"),
        ("float16", 1e6, "does not fit float16"),
    ],
)
def test_reference_values_have_one_spelling_and_fit_their_dtype(
    manifest: Manifest, dtype: str, value: object, message: str
) -> None:
    obj = manifest.to_dict()
    obj["health_check"]["inputs"]["input"] = {"dtype": dtype, "shape": [1], "values": [value]}
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(obj)
