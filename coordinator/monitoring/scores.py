"""The drift scores the tracker gives, the store keeps and the API shows (plain values).

One :class:`DriftScore` is the drift of one device's recent windows (``scope``
``"device"``) or of the whole fleet's (``scope`` ``"fleet"``, ``device_id`` None) for
one model version, against that version's reference profile. Frozen dataclasses of
plain values: the store writes them as JSON and pydantic validates them on the
API client's side (:mod:`coordinator.service.api_client`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLASSES", "CONFIDENCE", "DEVICE", "FEATURES", "FLEET", "DriftScore", "FeatureDrift"]

DEVICE = "device"
"""Scope of a score computed from one device's windows."""
FLEET = "fleet"
"""Scope of a score computed from the pooled windows of every device of a version."""
FEATURES = "features"
"""Signal: the inputs' features moved (covariate shift)."""
CONFIDENCE = "confidence"
"""Signal: the model's confidence moved (a label-free sign of concept drift)."""
CLASSES = "classes"
"""Signal: the predicted-class shares moved."""


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's drift (an entry of the top drifting features).

    Attributes:
        index: The feature's index in the reference profile (0-based).
        psi: Its PSI.
        js: Its Jensen-Shannon divergence, bits.
    """

    index: int
    psi: float
    js: float


@dataclass(frozen=True)
class DriftScore:
    """Drift of a device's (or the fleet's) recent windows against the reference.

    Attributes:
        scope: :data:`DEVICE` or :data:`FLEET`.
        device_id: The device; None for the fleet.
        model: Model name.
        version: Model version.
        at: When the score was computed (unix seconds, the service's clock).
        windows: Telemetry windows pooled into the score.
        n: Inputs behind the feature counts.
        psi_max: The largest feature PSI.
        js_max: The largest feature JS divergence (bits).
        severity: ``none``, ``moderate`` or ``major`` (PSI 0.1 / 0.25 conventions)
            of the worst of the feature, confidence and class shifts;
            ``insufficient`` with fewer than 500 effective rows behind the score
            (:func:`coordinator.monitoring.drift.effective_rows`).
        signal: Which shift the severity comes from: :data:`FEATURES`,
            :data:`CONFIDENCE` or :data:`CLASSES` (:data:`FEATURES` when nothing
            moved or the rows are too few).
        top: The most drifting features, highest PSI first.
        confidence_psi: PSI of the confidence signal; None if the model has none.
        classes_psi: PSI of the predicted-class shares; None if not a classifier.
        invalid: Inputs the devices refused in these windows, by reason.
        devices: For the fleet: the devices that drive it (highest PSI first);
            empty for a device.
    """

    scope: str
    device_id: str | None
    model: str
    version: int
    at: float
    windows: int
    n: int
    psi_max: float
    js_max: float
    severity: str
    signal: str = FEATURES
    top: tuple[FeatureDrift, ...] = ()
    confidence_psi: float | None = None
    classes_psi: float | None = None
    invalid: dict[str, int] = field(default_factory=dict)
    devices: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The score as a JSON-able dict (the store's column)."""
        return {
            "scope": self.scope,
            "device_id": self.device_id,
            "model": self.model,
            "version": self.version,
            "at": self.at,
            "windows": self.windows,
            "n": self.n,
            "psi_max": self.psi_max,
            "js_max": self.js_max,
            "severity": self.severity,
            "signal": self.signal,
            "top": [{"index": f.index, "psi": f.psi, "js": f.js} for f in self.top],
            "confidence_psi": self.confidence_psi,
            "classes_psi": self.classes_psi,
            "invalid": dict(self.invalid),
            "devices": list(self.devices),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftScore:
        """Read back what :meth:`to_dict` wrote (the store's own column: trusted)."""
        return cls(
            scope=str(data["scope"]),
            device_id=data["device_id"],
            model=str(data["model"]),
            version=int(data["version"]),
            at=float(data["at"]),
            windows=int(data["windows"]),
            n=int(data["n"]),
            psi_max=float(data["psi_max"]),
            js_max=float(data["js_max"]),
            severity=str(data["severity"]),
            signal=str(data.get("signal", FEATURES)),
            top=tuple(
                FeatureDrift(int(f["index"]), float(f["psi"]), float(f["js"])) for f in data["top"]
            ),
            confidence_psi=data["confidence_psi"],
            classes_psi=data["classes_psi"],
            invalid={str(k): int(v) for k, v in data["invalid"].items()},
            devices=tuple(str(d) for d in data["devices"]),
        )
