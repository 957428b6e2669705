"""Telemetry windows as an agent sends them, for the drift and retraining tests.

An agent serving a model closes a window summary every telemetry interval
(:mod:`edge_agent.monitoring`): the inputs' feature histograms on the reference
profile's bins, the top-class confidence histogram, the predicted classes and the
invalid-input counts. The tests build the same from data and model outputs
(:func:`agent_summary`) and wrap it in a telemetry batch of one window
(:func:`summary_batch`), to send over MQTT or to hand to the ingest directly.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from compress.profile import ReferenceProfile, bin_counts, class_probabilities, features
from edge_agent.protocol import (
    Histogram,
    InvalidCounts,
    LatencyQuantiles,
    TelemetryBatch,
    TelemetryRecord,
    WindowSummary,
)


def agent_summary(
    profile: ReferenceProfile,
    x: npt.NDArray[np.float32],
    outputs: npt.NDArray[np.float32],
    *,
    classes: int,
    invalid: InvalidCounts | None = None,
) -> WindowSummary:
    """What an agent's window summary holds after serving ``x`` (giving ``outputs``)
    with a classifier of ``classes`` classes and ``profile`` as its reference."""
    probs = class_probabilities(outputs)
    assert profile.confidence is not None
    conf_edges = np.asarray([profile.confidence.edges])
    return WindowSummary.from_arrays(
        n=len(x),
        features=bin_counts(profile.edge_array(), features(x)),
        confidence=bin_counts(conf_edges, probs.max(axis=1).reshape(-1, 1))[0],
        classes=np.bincount(probs.argmax(axis=1), minlength=classes),
        invalid=invalid or InvalidCounts(),
    )


def summary_batch(
    summary: WindowSummary, *, seq: int, model: str, version: int, start: float, end: float
) -> TelemetryBatch:
    """A telemetry batch of one window of ``model`` ``version``, from ``start`` to ``end``
    (unix seconds), carrying ``summary``."""
    record = TelemetryRecord(
        window_start=start, window_end=end, model=model, version=version,
        predictions=summary.n, errors=0, latency_ms=LatencyQuantiles(1.0, 2.0, 3.0),
        histogram=Histogram((1.0, 5.0), (summary.n, 0, 0)), cpu_percent=1.0,
        memory_bytes=1 << 20, uptime_s=1.0, summary=summary,
    )  # fmt: skip
    return TelemetryBatch(seq=seq, records=(record,))
