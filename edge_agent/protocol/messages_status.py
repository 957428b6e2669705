"""Messages from a device about itself: presence (:class:`Status`) and telemetry.

* :class:`Status` is retained on the device's ``status`` channel and doubles as
  its Last Will (``online=False``): what the device runs, what it can run, and
  which models it holds.
* :class:`TelemetryBatch` carries one or more :class:`TelemetryRecord` windows
  (predictions, errors, :class:`LatencyQuantiles`, a :class:`Histogram`, process
  figures) on the ``telemetry`` channel; the agent sends one per interval, or the
  spooled ones in order after reconnecting. A record may carry a
  :class:`~edge_agent.protocol.messages_summary.WindowSummary` (``summary``) when the
  served model's manifest has a reference profile: the window's feature, class and
  confidence counts and its refused inputs by reason (wire form and byte budget in
  that module and docs/monitoring.md). Decoders that predate it ignore the field.

Field rules and the base class: :mod:`edge_agent.protocol.messages_base`;
encoding: :mod:`edge_agent.protocol.messages`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from compress.manifest import TAG_RE
from compress.strictjson import FieldReader
from edge_agent.errors import SummaryError
from edge_agent.protocol.limits import Limits
from edge_agent.protocol.messages_base import (
    AGENT_VERSION_RE,
    IDENT_RE,
    MODEL_SPEC_MAX_CHARS,
    MODEL_SPEC_RE,
    Message,
    ModelInfo,
    check_no_body,
    read_model_info,
    read_scalars,
)
from edge_agent.protocol.messages_summary import WindowSummary
from edge_agent.protocol.topics import Channel


@dataclass(frozen=True, kw_only=True)
class Status(Message):
    """Presence and capabilities of a device (retained; also the Last Will).

    The Last Will is the same message with ``online=False``, encoded at connect
    time.

    Attributes:
        online: Whether the agent is connected.
        agent_version: The agent's version string (e.g. ``0.1.0``).
        hardware: Facts such as ``machine``, ``system``, ``cpu_count``,
            ``memory_bytes``; *key* -> str, int or float.
        runtimes: Inference runtimes available (*ident* each, e.g. ``onnxruntime``).
        tags: Hardware/deployment tags (1-64 of ``[A-Za-z0-9_.:=+-]``).
        models: Installed models.
        train_examples: Local examples the agent can train on (0: it does not
            take part in federated rounds). Optional on the wire (default 0).
        train_models: PyTorch model factories (``module:function``) this device
            has installed and can train; empty without ``fedge[torch]``. Optional
            on the wire (default empty).
        keyset_version: The version of the key set the device trusts, or None
            when it trusts fixed key files (no ``trust.keyset``). Optional on the
            wire (default None).
        stale: The device has a fleet configured but holds no fresh fleet
            statement (frozen or cut off from the coordinator's word on what to
            run). Optional on the wire (default false): older agents never send it.
    """

    TYPE: ClassVar[str] = "status"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.STATUS})

    online: bool
    agent_version: str
    hardware: dict[str, str | int | float] = field(default_factory=dict)
    runtimes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    models: tuple[ModelInfo, ...] = ()
    train_examples: int = 0
    train_models: tuple[str, ...] = ()
    keyset_version: int | None = None
    stale: bool = False

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "online": self.online,
            "agent_version": self.agent_version,
            "hardware": dict(self.hardware),
            "runtimes": list(self.runtimes),
            "tags": list(self.tags),
            "models": [
                {"name": m.name, "version": m.version, "sha256": m.sha256} for m in self.models
            ],
            "train_examples": self.train_examples,
            "train_models": list(self.train_models),
            "stale": self.stale,
        }
        if self.keyset_version is not None:  # absent from older agents' statuses too
            data["keyset_version"] = self.keyset_version
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        check_no_body(body, cls.TYPE)
        hardware = read_scalars(data, "hardware", limits)
        for key in ("runtimes", "tags"):  # reported before the models are checked
            if not data.has(key):
                raise data.fail(key, "missing")
        models = data.each("models", read_model_info, max_len=limits.max_list_items)
        return cls(
            online=data.boolean("online"),
            agent_version=data.text("agent_version", pattern=AGENT_VERSION_RE),
            hardware=hardware,
            runtimes=tuple(data.texts("runtimes", max_len=limits.max_list_items, pattern=IDENT_RE)),
            tags=tuple(data.texts("tags", max_len=limits.max_list_items, pattern=TAG_RE)),
            models=tuple(models),
            train_examples=data.opt_integer("train_examples") or 0,
            train_models=tuple(
                data.texts(
                    "train_models",
                    max_len=limits.max_list_items,
                    max_item_len=MODEL_SPEC_MAX_CHARS,
                    pattern=MODEL_SPEC_RE,
                    optional=True,
                )
            ),
            keyset_version=data.opt_integer("keyset_version", lo=1),
            stale=_optional_flag(data, "stale"),
        )


def _optional_flag(data: FieldReader, key: str) -> bool:
    """A boolean field newer senders add: absent or null reads as false."""
    return data.boolean(key) if data.raw(key) is not None else False


@dataclass(frozen=True, slots=True)
class LatencyQuantiles:
    """Inference latency quantiles over a window, in milliseconds.

    Attributes:
        p50: Median.
        p95: 95th percentile.
        p99: 99th percentile.
    """

    p50: float
    p95: float
    p99: float


@dataclass(frozen=True, slots=True)
class Histogram:
    """A latency histogram in milliseconds.

    Attributes:
        bounds: Strictly increasing, finite bucket upper bounds.
        counts: One count per bucket, plus one for values above the last bound
            (so ``len(counts) == len(bounds) + 1``).
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """Inference and resource figures for one time window.

    Attributes:
        window_start: Window start, unix seconds.
        window_end: Window end, unix seconds (>= ``window_start``).
        model: Model served (*ident*), or None with ``version`` None when none is.
        version: Its version.
        predictions: Predictions served in the window.
        errors: Failed inference calls in the window.
        latency_ms: Latency quantiles.
        histogram: Latency histogram.
        cpu_percent: Agent CPU use (may exceed 100 on several cores).
        memory_bytes: Agent resident memory.
        uptime_s: Agent uptime in seconds.
        summary: The window's summary against the served model's reference profile
            (None: no model, or one without a profile). Optional on the wire.
        explanations: Explanations served in the window (``POST /v1/explain``; not
            predictions). Optional on the wire: absent when 0.
    """

    window_start: float
    window_end: float
    model: str | None
    version: int | None
    predictions: int
    errors: int
    latency_ms: LatencyQuantiles
    histogram: Histogram
    cpu_percent: float
    memory_bytes: int
    uptime_s: float
    summary: WindowSummary | None = None
    explanations: int = 0


def _record_to_json(record: TelemetryRecord) -> dict[str, Any]:
    data = {
        "window_start": record.window_start,
        "window_end": record.window_end,
        "model": record.model,
        "version": record.version,
        "predictions": record.predictions,
        "errors": record.errors,
        "latency_ms": {
            "p50": record.latency_ms.p50,
            "p95": record.latency_ms.p95,
            "p99": record.latency_ms.p99,
        },
        "histogram": {
            "bounds": list(record.histogram.bounds),
            "counts": list(record.histogram.counts),
        },
        "cpu_percent": record.cpu_percent,
        "memory_bytes": record.memory_bytes,
        "uptime_s": record.uptime_s,
    }
    if record.summary is not None:
        data["summary"] = record.summary.to_json()
    if record.explanations:
        data["explanations"] = record.explanations
    return data


def _record_from_json(records: FieldReader, key: str, limits: Limits) -> TelemetryRecord:
    rec = records.req_obj(key)
    start = rec.number("window_start")
    end = rec.number("window_end", lo=start)
    if (rec.raw("model") is None) != (rec.raw("version") is None):
        raise records.fail(key, "model and version must both be set or both be null")
    latency = rec.req_obj("latency_ms")
    hist = rec.req_obj("histogram")
    max_items = limits.max_list_items
    bounds = hist.each("bounds", lambda r, k: r.number(k, lo=-math.inf), max_len=max_items)
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise hist.fail("bounds", "must be strictly increasing")
    counts = hist.each("counts", FieldReader.integer, max_len=max_items)
    if len(counts) != len(bounds) + 1:
        raise hist.fail("counts", "must have one more entry than bounds")
    summary = None
    raw_summary = rec.raw("summary")
    if raw_summary is not None:
        if rec.raw("model") is None:
            raise SummaryError(f"{key}.summary: a summary needs the model it was taken for")
        rec.wrap("summary", raw_summary)  # an object, or MalformedMessageError
        summary = WindowSummary.from_json(raw_summary)
    return TelemetryRecord(
        window_start=start,
        window_end=end,
        model=rec.opt_text("model", pattern=IDENT_RE),
        version=rec.opt_integer("version"),
        predictions=rec.integer("predictions"),
        errors=rec.integer("errors"),
        latency_ms=LatencyQuantiles(
            p50=latency.number("p50"), p95=latency.number("p95"), p99=latency.number("p99")
        ),
        histogram=Histogram(bounds=tuple(bounds), counts=tuple(counts)),
        cpu_percent=rec.number("cpu_percent"),
        memory_bytes=rec.integer("memory_bytes"),
        uptime_s=rec.number("uptime_s"),
        summary=summary,
        explanations=rec.opt_integer("explanations") or 0,
    )


@dataclass(frozen=True, kw_only=True)
class TelemetryBatch(Message):
    """Telemetry: a batch of window records.

    Attributes:
        seq: Batch sequence number (gaps reveal lost batches).
        dropped: Records dropped since the previous batch (buffer overflow).
        records: The records (0..``limits.max_list_items``).
        stale: The device held no fresh fleet statement when it made the batch
            (see :class:`Status`). Optional on the wire (default false).
    """

    TYPE: ClassVar[str] = "telemetry_batch"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.TELEMETRY})

    seq: int
    dropped: int = 0
    records: tuple[TelemetryRecord, ...] = ()
    stale: bool = False

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "seq": self.seq,
            "dropped": self.dropped,
            "records": [_record_to_json(record) for record in self.records],
            "stale": self.stale,
        }
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        check_no_body(body, cls.TYPE)
        return cls(
            seq=data.integer("seq"),
            dropped=data.integer("dropped"),
            records=tuple(
                data.each(
                    "records",
                    lambda r, k: _record_from_json(r, k, limits),
                    max_len=limits.max_list_items,
                )
            ),
            stale=_optional_flag(data, "stale"),
        )
