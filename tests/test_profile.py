"""Reference profiles: features per view, deciles and shares, strict JSON, the manifest field."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from compress.errors import ManifestError, ProfileError
from compress.manifest import Manifest, TensorSpec
from compress.profile import (
    CONFIDENCE_EDGES,
    MAX_PROFILE_BYTES,
    ReferenceProfile,
    bin_counts,
    feature_count,
    feature_view,
    features,
    profile_from_data,
)
from tests.conftest import make_manifest

RNG = np.random.default_rng(7)


def _profile(shape: tuple[int, ...] = (8,), rows: int = 400, classes: int = 4) -> ReferenceProfile:
    x = RNG.normal(size=(rows, *shape)).astype(np.float32)
    return profile_from_data(x, RNG.normal(size=(rows, classes)), "classification")


@pytest.mark.parametrize(
    ("shape", "view", "count"),
    [
        ((8,), "vector", 8),
        ((100,), "vector", 64),
        ((6, 50), "sequence", 12),
        ((40, 20), "sequence", 64),
        ((3, 32, 32), "image", 48),
        ((8, 16, 16), "image", 64),
        ((1, 2, 3), "image", 6),
        ((2, 3, 4, 5), "vector", 64),
    ],
)
def test_feature_views_and_counts(shape: tuple[int, ...], view: str, count: int) -> None:
    assert feature_view(shape) == view
    assert feature_count(shape) == count
    out = features(RNG.normal(size=(5, *shape)))
    assert out.shape == (5, count)
    assert out.dtype == np.float32


def test_vector_groups_are_contiguous_means() -> None:
    x = np.arange(128, dtype=np.float32).reshape(1, 128)
    out = features(x)
    np.testing.assert_allclose(out[0], np.arange(64) * 2 + 0.5)
    small = np.arange(8, dtype=np.float32).reshape(1, 8)
    np.testing.assert_array_equal(features(small), small)


def test_sequence_features_are_channel_means_then_stds() -> None:
    x = np.stack([np.full(10, 3.0), np.tile([0.0, 2.0], 5)]).astype(np.float32)[None]
    np.testing.assert_allclose(features(x)[0], [3.0, 1.0, 0.0, 1.0])


def test_image_features_are_grid_cell_means_per_channel() -> None:
    img = np.zeros((1, 2, 8, 8), dtype=np.float32)
    img[0, 0, :2, :2] = 4.0  # channel 0, top-left cell
    img[0, 1, 6:, 6:] = 8.0  # channel 1, bottom-right cell
    out = features(img)[0].reshape(2, 4, 4)
    assert out[0, 0, 0] == 4.0
    assert out[1, 3, 3] == 8.0
    assert out.sum() == 12.0


def test_reference_shares_follow_deciles() -> None:
    profile = _profile(rows=1000)
    shares = np.asarray(profile.reference)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-4)
    assert np.all(np.abs(shares - 0.1) < 0.01)
    edges = profile.edge_array()
    assert np.all(np.diff(edges, axis=1) >= 0)
    assert all(float(f"{e:.6g}") == e for e in edges.ravel())  # 6 significant digits


def test_bin_counts_count_rows_per_feature() -> None:
    edges = np.tile(np.arange(1, 10, dtype=np.float64), (2, 1))
    values = np.array([[0.5, 9.5], [1.0, 9.0], [5.5, 5.5]], dtype=np.float32)
    counts = bin_counts(edges, values)
    assert counts.shape == (2, 10)
    assert counts[0].tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    assert counts[1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 2]


def test_value_range_is_widened_by_a_margin() -> None:
    x = np.linspace(0.0, 1.0, 50, dtype=np.float32).reshape(50, 1)
    profile = profile_from_data(x, np.zeros((50, 1)), "regression")
    assert profile.value_range == pytest.approx((-0.1, 1.1))
    assert profile.classes is None
    assert profile.confidence is None


def test_classification_keeps_class_and_max_prob_shares() -> None:
    probs = np.array([[0.92, 0.08], [0.15, 0.85], [0.65, 0.35], [0.95, 0.05]])
    profile = profile_from_data(np.zeros((4, 3)), probs, "classification")
    assert profile.classes == (0.75, 0.25)
    assert profile.confidence is not None
    assert profile.confidence.kind == "max_prob"
    assert profile.confidence.edges == CONFIDENCE_EDGES
    assert profile.confidence.reference[6] == 0.25  # 0.65: bin b holds edges[b-1] <= v
    assert profile.confidence.reference[8] == 0.25  # 0.85
    assert profile.confidence.reference[9] == 0.5  # 0.92, 0.95


def test_logits_become_probabilities() -> None:
    logits = np.array([[5.0, -5.0], [-5.0, 5.0]])
    profile = profile_from_data(np.zeros((2, 3)), logits, "classification")
    assert profile.classes == (0.5, 0.5)
    assert profile.confidence is not None
    assert profile.confidence.logits  # recorded: devices apply the softmax too
    assert profile.confidence is not None
    assert profile.confidence.reference[9] == 1.0


def test_reconstruction_bins_the_score_at_its_deciles() -> None:
    x = RNG.normal(size=(200, 6)).astype(np.float32)
    scores = np.linspace(0.0, 1.0, 200)
    profile = profile_from_data(x, scores, "reconstruction")
    assert profile.confidence is not None
    assert profile.confidence.kind == "score"
    assert profile.confidence.edges[4] == pytest.approx(0.5, abs=0.01)
    recon = profile_from_data(x, x + 0.1, "reconstruction")  # output = the input's shape
    assert recon.confidence is not None
    assert recon.confidence.edges[0] == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize(
    ("x", "outputs", "task", "match"),
    [
        (np.zeros((3, 2)), np.zeros((3, 2)), "ranking", "unknown task"),
        (np.zeros(3), np.zeros((3, 2)), "classification", "batch"),
        (np.array([[np.nan, 1.0]]), np.zeros((1, 2)), "classification", "NaN"),
        (np.zeros((3, 2)), np.zeros((3, 101)), "classification", "2 <= K <= 100"),
        (np.zeros((3, 2)), np.zeros((3, 5, 5)), "reconstruction", "score per row"),
    ],
)
def test_unusable_reference_data_is_refused(
    x: Any, outputs: Any, task: Any, match: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ProfileError, match=match):
        profile_from_data(x, outputs, task)


def test_round_trip_and_worst_case_size() -> None:
    profile = _profile((3, 16, 16), rows=300, classes=100)
    assert profile.feature_count == 48
    assert ReferenceProfile.from_bytes(profile.to_bytes()) == profile
    # Worst case: 64 features with long edge spellings, 100 classes.
    x = (RNG.normal(size=(2000, 100)) * 1.234567e-5 - 3.3e-7).astype(np.float32)
    big = profile_from_data(x, RNG.normal(size=(2000, 100)), "classification")
    assert big.feature_count == 64
    assert len(big.to_bytes()) <= MAX_PROFILE_BYTES


def _hostile(profile: ReferenceProfile, **changes: Any) -> bytes:
    obj = profile.to_dict()
    obj.update(changes)
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bins": 12}, "bins"),
        ({"edges": "x"}, "edges"),
        ({"reference": [[0.1] * 10] * 7}, "reference"),
        ({"reference": [[0.5] * 10] * 8}, "sum"),
        ({"reference": [[1.5] + [0.0] * 9] * 8}, "outside"),
        ({"value_range": [2.0, 1.0]}, "lo is above hi"),
        ({"classes": None}, "classes"),
        ({"confidence": None}, "confidence"),
        ({"task": "regression"}, "classes"),
        ({"input_shape": [9]}, "edges"),
        ({"rows": 0}, "rows"),
    ],
)
def test_hostile_profiles_are_refused(change: dict[str, Any], match: str) -> None:
    profile = _profile()
    with pytest.raises(ProfileError, match=match):
        ReferenceProfile.from_bytes(_hostile(profile, **change))


def test_decreasing_edges_and_wrong_confidence_edges_are_refused() -> None:
    profile = _profile()
    edges = [list(e) for e in profile.edges]
    edges[3] = edges[3][::-1]
    with pytest.raises(ProfileError, match="non-decreasing"):
        ReferenceProfile.from_bytes(_hostile(profile, edges=edges))
    assert profile.confidence is not None
    conf = profile.confidence.to_dict() | {"edges": [0.05 * i for i in range(1, 10)]}
    with pytest.raises(ProfileError, match="max_prob edges"):
        ReferenceProfile.from_bytes(_hostile(profile, confidence=conf))


def test_oversized_profile_is_refused_before_parsing() -> None:
    with pytest.raises(ProfileError, match="max is"):
        ReferenceProfile.from_bytes(b" " * (MAX_PROFILE_BYTES + 1))


def test_manifest_carries_the_profile_signed() -> None:
    profile = _profile((64,), classes=10)
    manifest = make_manifest(reference=profile)
    parsed = Manifest.from_bytes(manifest.to_bytes())
    assert parsed.reference == profile
    assert parsed.extra == {}


def test_manifest_without_profile_stays_valid() -> None:
    manifest = make_manifest()
    assert manifest.reference is None
    assert b"reference" not in manifest.to_bytes()
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


def test_profile_must_fit_the_manifest_input() -> None:
    with pytest.raises(ManifestError, match="does not fit input"):
        make_manifest(reference=_profile((8,)))
    dynamic = make_manifest(
        inputs=(TensorSpec("input", (None, None)),), reference=_profile((8,), classes=10)
    )
    assert dynamic.reference is not None


def test_profile_errors_inside_a_manifest_are_manifest_errors() -> None:
    manifest = make_manifest(reference=_profile((64,), classes=10))
    obj = manifest.to_dict()
    obj["reference"]["bins"] = 3  # type: ignore[index]
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ManifestError, match="bins"):
        Manifest.from_bytes(data)


def test_probabilities_are_recorded_as_such() -> None:
    profile = _profile()  # random normal outputs: logits
    assert profile.confidence is not None
    assert profile.confidence.logits
    probs = np.array([[0.7, 0.3], [0.4, 0.6]])
    recorded = profile_from_data(np.zeros((2, 3)), probs, "classification")
    assert recorded.confidence is not None
    assert not recorded.confidence.logits


def test_logits_flag_only_for_max_prob() -> None:
    x = RNG.normal(size=(50, 3)).astype(np.float32)
    profile = profile_from_data(x, RNG.random(50), "reconstruction")
    assert profile.confidence is not None
    conf = profile.confidence.to_dict() | {"logits": True}
    with pytest.raises(ProfileError, match="logits"):
        ReferenceProfile.from_bytes(_hostile(profile, confidence=conf))


def test_oversized_profile_inside_a_manifest_is_refused() -> None:
    manifest = make_manifest(reference=_profile((64,), classes=10))
    obj = manifest.to_dict()
    ref = obj["reference"]
    # Spell every edge and share with 17 digits: still a valid profile, but over 16 KiB.
    ref["edges"] = [[e + 1.2345678e-9 for e in row] for row in ref["edges"]]  # type: ignore[index]
    ref["reference"] = [[v + 1.2345678e-9 for v in row] for row in ref["reference"]]  # type: ignore[index]
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert len(json.dumps(ref)) > MAX_PROFILE_BYTES
    with pytest.raises(ManifestError, match="max is"):
        Manifest.from_bytes(data)
