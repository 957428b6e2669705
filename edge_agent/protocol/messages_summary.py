"""The window summary: what a device's served inputs looked like, in a few counts.

An agent serving a model whose manifest carries a reference profile
(:mod:`compress.profile`) counts, per telemetry window, how many examples fell in
each reference bin of each feature, which class each was predicted as, and in which
confidence bin it landed; and how many requests it refused, by reason. The
:class:`WindowSummary` travels as the optional ``summary`` field of a
:class:`~edge_agent.protocol.TelemetryRecord`; the coordinator compares it with the
profile (PSI, Jensen-Shannon).

Wire form (one JSON object; canonical key order is the encoder's business)::

    {"n": 412,                       # examples summarised (valid ones)
     "f": 64,                        # features F (1..64)
     "k": 10,                        # classes K (2..100), or null: not a classifier
     "confidence": true,             # whether 10 confidence cells follow the features
     "counts": "<base85>",           # uint16 little-endian cells, see below
     "invalid": {"shape": 0, "dtype": 0, "nan": 2, "out_of_range": 1}}

``counts`` is Python's ``base64.b85encode`` (RFC 1924 alphabet, which holds no
``"`` or ``\\``) of ``F*10 + (10 if confidence) + K`` uint16 little-endian cells:
the feature counts row-major (feature 0's ten bins first), then the confidence
bins, then the class counts. A cell saturates at 65535. Base85 rather than base64
keeps the worst case (F = 64, K = 100, every count at its largest) at
:data:`MAX_SUMMARY_BYTES` = 2 KiB of JSON (base64 would need 2.1 KiB).

Decoding (:meth:`WindowSummary.from_json`) is strict and raises
:class:`~edge_agent.errors.SummaryError`: ``f`` over 64 or ``k`` over 100, a
``counts`` string of the wrong length or not canonical base85, and counts that do
not add up: ``n`` and the refused counts are at most :data:`MAX_COUNT`
(2**32 - 1, the agent saturates them), each feature's ten cells, the confidence
cells and the class cells sum to ``n`` exactly (to at most ``n`` when a cell
saturated). Counts are unsigned by construction, so negative or NaN counts cannot
be expressed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.profile import BINS, MAX_CLASSES, MAX_FEATURES, ReferenceProfile
from compress.strictjson import FieldReader
from edge_agent.errors import SummaryError

__all__ = [
    "INVALID_REASONS",
    "MAX_CELL",
    "MAX_COUNT",
    "MAX_SUMMARY_BYTES",
    "InvalidCounts",
    "WindowSummary",
]

#: A count cell saturates here (uint16).
MAX_CELL = 65535
#: ``n`` and the refused counts saturate here (their digits count in the byte budget).
MAX_COUNT = 2**32 - 1
#: Largest JSON encoding of one summary (F = 64, K = 100, every count at its largest).
MAX_SUMMARY_BYTES = 2 * 1024
#: Why the agent refuses an input (the keys of ``invalid``).
INVALID_REASONS = ("shape", "dtype", "nan", "out_of_range")

_MAX_CELLS = MAX_FEATURES * BINS + BINS + MAX_CLASSES
_MAX_COUNTS_CHARS = (2 * _MAX_CELLS * 5 + 3) // 4


@dataclass(frozen=True, slots=True)
class InvalidCounts:
    """Refused requests in a window, by reason."""

    shape: int = 0
    dtype: int = 0
    nan: int = 0
    out_of_range: int = 0

    def to_json(self) -> dict[str, int]:
        """JSON form."""
        return {
            "shape": self.shape,
            "dtype": self.dtype,
            "nan": self.nan,
            "out_of_range": self.out_of_range,
        }

    @property
    def total(self) -> int:
        """All refused requests."""
        return self.shape + self.dtype + self.nan + self.out_of_range


def _saturated(counts: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    return np.minimum(np.asarray(counts, dtype=np.int64), MAX_CELL).astype("<u2")


@dataclass(frozen=True, slots=True)
class WindowSummary:
    """Counts of one telemetry window against a model's reference profile.

    Attributes:
        n: Examples summarised (valid inputs; a batch of 8 counts 8).
        features: Per feature, 10 bin counts (each saturated at 65535).
        confidence: 10 confidence-bin counts, or None (regression).
        classes: Per class, how many examples were predicted as it, or None.
        invalid: Refused requests by reason.
    """

    n: int
    features: tuple[tuple[int, ...], ...]
    confidence: tuple[int, ...] | None
    classes: tuple[int, ...] | None
    invalid: InvalidCounts

    @classmethod
    def from_arrays(
        cls,
        n: int,
        features: npt.ArrayLike,
        confidence: npt.ArrayLike | None,
        classes: npt.ArrayLike | None,
        invalid: InvalidCounts,
    ) -> WindowSummary:
        """Build a summary from count arrays (``features`` ``(F, 10)``), saturating cells
        at :data:`MAX_CELL` and ``n`` at :data:`MAX_COUNT`."""
        feats = _saturated(features).reshape(-1, BINS)
        return cls(
            n=min(n, MAX_COUNT),
            features=tuple(tuple(int(c) for c in row) for row in feats),
            confidence=None if confidence is None else tuple(_saturated(confidence).tolist()),
            classes=None if classes is None else tuple(_saturated(classes).tolist()),
            invalid=invalid,
        )

    def check_fits(self, profile: ReferenceProfile) -> None:
        """Check that this summary was taken against ``profile`` (the profile of the
        model version its record names): as many features and classes, and a
        confidence signal exactly when the profile has one. The coordinator calls it
        before comparing counts with shares.

        Raises:
            SummaryError: a summary of another shape than the profile's.
        """
        k = None if profile.classes is None else len(profile.classes)
        problems = [
            f"{what} {mine} != profile's {theirs}"
            for what, mine, theirs in (
                ("features", len(self.features), profile.feature_count),
                ("classes", None if self.classes is None else len(self.classes), k),
                ("confidence", self.confidence is not None, profile.confidence is not None),
            )
            if mine != theirs
        ]
        if problems:
            raise SummaryError(f"summary does not fit the model's profile: {'; '.join(problems)}")

    def feature_counts(self) -> npt.NDArray[np.int64]:
        """The feature counts as an ``(F, 10)`` array."""
        return np.asarray(self.features, dtype=np.int64).reshape(len(self.features), BINS)

    def to_json(self) -> dict[str, Any]:
        """The wire form (see the module docstring)."""
        cells = [np.asarray(self.features, dtype="<u2").ravel()]
        if self.confidence is not None:
            cells.append(np.asarray(self.confidence, dtype="<u2"))
        if self.classes is not None:
            cells.append(np.asarray(self.classes, dtype="<u2"))
        return {
            "n": self.n,
            "f": len(self.features),
            "k": None if self.classes is None else len(self.classes),
            "confidence": self.confidence is not None,
            "counts": base64.b85encode(np.concatenate(cells).tobytes()).decode("ascii"),
            "invalid": self.invalid.to_json(),
        }

    def encoded_size(self) -> int:
        """Bytes of the compact JSON encoding of :meth:`to_json`."""
        return len(json.dumps(self.to_json(), separators=(",", ":")).encode())

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> WindowSummary:
        """Parse and check a summary's wire form.

        Raises:
            SummaryError: a missing or invalid field, wrong sizes, counts that do not
                add up to ``n``.
        """
        r = FieldReader(obj, SummaryError, "summary")
        n = r.integer("n", hi=MAX_COUNT)
        f = r.integer("f", lo=1, hi=MAX_FEATURES)
        k = r.opt_integer("k", lo=2, hi=MAX_CLASSES)
        has_confidence = r.boolean("confidence")
        cells = f * BINS + (BINS if has_confidence else 0) + (k or 0)
        text = r.text("counts", max_len=_MAX_COUNTS_CHARS)
        try:
            raw = base64.b85decode(text)
        except (ValueError, binascii.Error) as exc:
            raise r.fail("counts", f"not base85: {exc}") from exc
        if len(raw) != 2 * cells or base64.b85encode(raw).decode("ascii") != text:
            raise r.fail("counts", f"expected the canonical base85 of {cells} uint16 cells")
        values = np.frombuffer(raw, dtype="<u2").astype(np.int64)
        feats = values[: f * BINS].reshape(f, BINS)
        rest = values[f * BINS :]
        confidence = rest[:BINS] if has_confidence else None
        classes = rest[BINS:] if has_confidence else rest
        _check_sums(r, "counts", feats, n)
        if confidence is not None:
            _check_sums(r, "counts (confidence)", confidence.reshape(1, BINS), n)
        if k is not None:
            _check_sums(r, "counts (classes)", classes.reshape(1, k), n)
        inv = r.req_obj("invalid")
        if sorted(inv.keys()) != sorted(INVALID_REASONS):
            raise r.fail("invalid", f"expected exactly the keys {', '.join(INVALID_REASONS)}")
        return cls(
            n=n,
            features=tuple(tuple(int(c) for c in row) for row in feats),
            confidence=None if confidence is None else tuple(int(c) for c in confidence),
            classes=None if k is None else tuple(int(c) for c in classes),
            invalid=InvalidCounts(
                **{reason: inv.integer(reason, hi=MAX_COUNT) for reason in INVALID_REASONS}
            ),
        )


def _check_sums(r: FieldReader, key: str, rows: npt.NDArray[np.int64], n: int) -> None:
    """Each row sums to ``n`` (to at most ``n`` when one of its cells saturated)."""
    sums = rows.sum(axis=1)
    saturated = (rows == MAX_CELL).any(axis=1)
    bad = np.flatnonzero(np.where(saturated, sums > n, sums != n))
    if bad.size:
        row = int(bad[0])
        raise r.fail(key, f"row {row} sums to {int(sums[row])}, not to the {n} examples")
