"""The model manifest: what a signed artifact promises about its model.

A :class:`Manifest` names a model and a strictly increasing integer version, and pins
the payload by format, byte length and sha256. It describes the model's inputs and
outputs (names, shapes with ``None`` for dynamic dimensions, dtypes), how it was
quantized, when it was created and when it expires, which hardware tags a device needs
to run it, and optionally a health check: reference inputs with the outputs they must
produce (within tolerances, under a latency bound) before an agent switches to it,
and optionally a reference profile (:class:`compress.profile.ReferenceProfile`, the
``reference`` field): the input features, value range, class and confidence shares of
the packager's reference data, against which agents validate inputs and the
coordinator measures drift. Manifests without it stay valid, and an agent older than
the field keeps it as an unknown field (still signed, written back unchanged). The
optional ``lineage`` field (:class:`compress.lineage.Lineage`) records where the
model came from (run, trigger, parent, code version) the same way.

Workflow: the coordinator builds a ``Manifest`` when packaging
(``coordinator.delivery.packaging``), encodes it with :meth:`Manifest.to_bytes` and signs those
bytes (:mod:`compress.signing`). An agent receives the bytes, checks signatures over the
bytes as received, and only then parses them with :meth:`Manifest.from_bytes`.

There is exactly one byte encoding (canonical JSON: sorted keys, compact, UTF-8);
``from_bytes`` rejects any other spelling of the same content, so a manifest has one
identity. Fields this version does not know are kept in :attr:`Manifest.extra` and
written back unchanged, so an older agent can verify and use a manifest from a newer
coordinator; a change that older agents must not misread bumps :data:`SCHEMA_VERSION`,
and agents reject schemas newer than theirs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from compress.errors import CompressError, ManifestError
from compress.lineage import NAME_RE, SHA256_RE, Lineage
from compress.profile import MAX_PROFILE_BYTES, ReferenceProfile
from compress.strictjson import FieldReader, JsonObject, decode_canonical, encode_canonical

SCHEMA_VERSION = 1
#: A signed manifest travels in one deploy message (``edge_agent.protocol.Limits``
#: derives its ``max_manifest_bytes`` from these), so manifests stay small.
MAX_MANIFEST_BYTES = 48 * 1024
#: Largest model payload; also the largest chunked transfer the protocol accepts.
MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
MAX_TENSORS = 16
MAX_DIMS = 8
MAX_REFERENCE_VALUES = 4096
MAX_TAGS = 32
MAX_METADATA = 64

TENSOR_NAME_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:=+-]{0,63}")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")

FORMATS = ("onnx", "tflite")
QUANTIZATIONS = ("none", "int8-dynamic", "int8-static", "fp16")
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


def format_time(moment: datetime) -> str:
    """A UTC timestamp in the manifest's one format, whole seconds (``...Z``)."""
    if moment.tzinfo is None:
        raise ManifestError("timestamps must be timezone-aware")
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """Parse a manifest timestamp (``YYYY-MM-DDTHH:MM:SSZ``).

    Raises:
        ManifestError: any other format, or an impossible date.
    """
    if not TIME_RE.fullmatch(text):
        raise ManifestError(f"timestamp {text[:40]!r} is not YYYY-MM-DDTHH:MM:SSZ")
    try:
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise ManifestError(f"timestamp {text!r}: {exc}") from exc


def read_time(r: FieldReader, key: str) -> datetime:
    """The timestamp field ``key`` of a signed document (:func:`parse_time`'s format).

    Raises:
        CompressError: (the reader's error class) a missing, too long or malformed
            timestamp, naming the field.
    """
    text = r.text(key, max_len=20)
    try:
        return parse_time(text)
    except ManifestError as exc:
        raise r.fail(key, str(exc)) from exc


def whole_seconds(moment: datetime, error: type[CompressError], what: str) -> datetime:
    """``moment`` in UTC, whole seconds: exactly what survives the encoding.

    Raises:
        CompressError: (``error``) ``moment`` is not a timezone-aware datetime; the
            message starts with ``what`` (e.g. ``key set created``).
    """
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise error(f"{what} must be a timezone-aware datetime")
    return parse_time(format_time(moment))


def require_aware(now: datetime) -> None:
    """Raise unless ``now`` is a timezone-aware datetime.

    Raises:
        ValueError: a naive (or not a) datetime: a caller's bug, not a document's.
    """
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (``None`` = dynamic), dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def to_dict(self) -> JsonObject:
        """JSON form."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_reader(cls, r: FieldReader) -> TensorSpec:
        """Parse one tensor spec.

        Raises:
            ManifestError: bad name, shape or dtype.
        """
        name = r.text("name", max_len=128, pattern=TENSOR_NAME_RE)
        dims = r.items("shape", max_len=MAX_DIMS)
        shape: list[int | None] = []
        for i, dim in enumerate(dims):
            if dim is None:
                shape.append(None)
            elif isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= 2**31:
                shape.append(dim)
            else:
                raise r.fail(f"shape[{i}]", f"expected a positive integer or null, got {dim!r}")
        dtype = r.text("dtype", max_len=16, choices=DTYPES)
        return cls(name=name, shape=tuple(shape), dtype=dtype)


@dataclass(frozen=True)
class ReferenceTensor:
    """A small array stored inside the manifest (health-check inputs and outputs)."""

    dtype: str
    shape: tuple[int, ...]
    values: tuple[float | int | bool, ...]

    @classmethod
    def from_array(cls, array: npt.ArrayLike) -> ReferenceTensor:
        """Capture an array exactly (float32 values survive the JSON round trip).

        Raises:
            ManifestError: an unsupported dtype, too many values, or non-finite values.
        """
        arr = np.asarray(array)
        if arr.dtype.name not in DTYPES:
            raise ManifestError(f"reference tensors must be one of {DTYPES}, got {arr.dtype}")
        if arr.size > MAX_REFERENCE_VALUES:
            raise ManifestError(
                f"reference tensor has {arr.size} values, max is {MAX_REFERENCE_VALUES}"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ManifestError("reference tensors must be finite")
        return cls(
            dtype=arr.dtype.name,
            shape=tuple(int(d) for d in arr.shape),
            values=tuple(arr.ravel().tolist()),
        )

    def array(self) -> npt.NDArray[Any]:
        """The values as a numpy array of the stored dtype and shape."""
        return np.asarray(self.values, dtype=self.dtype).reshape(self.shape)

    def to_dict(self) -> JsonObject:
        """JSON form."""
        kind = bool if self.dtype == "bool" else int if self.dtype[0] in "iu" else float
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "values": [kind(v) for v in self.values],
        }

    @classmethod
    def from_reader(cls, r: FieldReader) -> ReferenceTensor:
        """Parse one reference tensor.

        Raises:
            ManifestError: bad dtype, shape, value count or values.
        """
        dtype = r.text("dtype", max_len=16, choices=DTYPES)
        dims = r.items("shape", max_len=MAX_DIMS)
        size = 1
        for i, dim in enumerate(dims):
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= 2**31:
                raise r.fail(f"shape[{i}]", f"expected a non-negative integer, got {dim!r}")
            size *= dim
        values = r.items("values", max_len=MAX_REFERENCE_VALUES)
        if size != len(values):
            raise r.fail("values", f"{len(values)} values do not fill shape {dims}")
        lo: float
        hi: float
        if dtype == "bool":
            kind: type = bool
            lo, hi = 0, 1
        elif dtype.startswith(("int", "uint")):
            kind = int
            info = np.iinfo(dtype)
            lo, hi = int(info.min), int(info.max)
        else:
            kind = float
            finfo = np.finfo(dtype)
            lo, hi = float(finfo.min), float(finfo.max)
        for i, v in enumerate(values):
            # One spelling per value: floats as JSON floats (1.0, never 1), ints as ints.
            if type(v) is not kind:
                raise r.fail(f"values[{i}]", f"expected a {kind.__name__} for dtype {dtype}")
            number = cast(float, v)  # type(v) is bool, int or float: all compare exactly
            if not (lo <= number <= hi):
                raise r.fail(f"values[{i}]", f"{v} does not fit {dtype}")
        return cls(dtype=dtype, shape=tuple(dims), values=tuple(values))


@dataclass(frozen=True)
class HealthCheck:
    """Reference inputs and the outputs they must produce before an install switches.

    ``outputs`` are compared with ``np.allclose(actual, expected, rtol, atol)``; one
    inference over the reference inputs must take at most ``max_latency_ms``.
    """

    inputs: Mapping[str, ReferenceTensor]
    outputs: Mapping[str, ReferenceTensor]
    rtol: float = 0.05
    atol: float = 0.02
    max_latency_ms: float = 1000.0

    def to_dict(self) -> JsonObject:
        """JSON form."""
        return {
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "rtol": float(self.rtol),
            "atol": float(self.atol),
            "max_latency_ms": float(self.max_latency_ms),
        }

    @classmethod
    def from_reader(cls, r: FieldReader) -> HealthCheck:
        """Parse a health check.

        Raises:
            ManifestError: bad tensors or tolerances.
        """

        def tensors(key: str) -> dict[str, ReferenceTensor]:
            group = r.req_obj(key)
            names = group.keys()
            if not names or len(names) > MAX_TENSORS:
                raise r.fail(key, f"expected 1 to {MAX_TENSORS} tensors")
            out = {}
            for name in names:
                if not TENSOR_NAME_RE.fullmatch(name):
                    raise r.fail(key, f"bad tensor name {name[:64]!r}")
                out[name] = ReferenceTensor.from_reader(group.req_obj(name))
            return out

        return cls(
            inputs=tensors("inputs"),
            outputs=tensors("outputs"),
            rtol=r.number("rtol", lo=0.0, hi=1e6),
            atol=r.number("atol", lo=0.0, hi=1e6),
            max_latency_ms=r.number("max_latency_ms", lo=0.0, hi=3.6e6),
        )


def _check_profile_fits(profile: ReferenceProfile, spec: TensorSpec) -> None:
    """The profile describes examples of the manifest's first input, within its size
    bound (a profile read inside a manifest is not parsed by its own ``from_bytes``).

    Raises:
        ManifestError: a different rank, a fixed dimension that differs, or a profile
            over :data:`compress.profile.MAX_PROFILE_BYTES`.
    """
    example = spec.shape[1:]
    fits = len(example) == len(profile.input_shape) and all(
        d is None or d == p for d, p in zip(example, profile.input_shape, strict=True)
    )
    if not fits:
        raise ManifestError(
            f"manifest.reference: profile of examples {profile.input_shape} does not fit "
            f"input {spec.name!r} of shape {spec.shape}"
        )
    size = len(profile.to_bytes())
    if size > MAX_PROFILE_BYTES:
        raise ManifestError(f"manifest.reference is {size} bytes, max is {MAX_PROFILE_BYTES}")


_KNOWN_FIELDS = frozenset(
    {
        "schema", "name", "version", "format", "sha256", "length", "inputs", "outputs",
        "quantization", "created", "expires", "hardware_tags", "health_check", "metadata",
        "reference", "lineage",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Manifest:
    """Everything an agent needs to decide whether to trust and run a model payload."""

    name: str
    version: int
    format: str
    sha256: str
    length: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantization: str
    created: datetime
    expires: datetime
    hardware_tags: tuple[str, ...] = ()
    health_check: HealthCheck | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    reference: ReferenceProfile | None = None
    lineage: Lineage | None = None

    def __post_init__(self) -> None:
        # Validate by encoding and parsing the canonical bytes: one set of rules for
        # both directions, and nothing can be signed that a verifier would refuse.
        Manifest.from_bytes(self.to_bytes())

    def to_dict(self) -> JsonObject:
        """JSON form (unknown fields from a newer writer included)."""
        obj: JsonObject = dict(self.extra)
        obj.update(
            {
                "schema": self.schema,
                "name": self.name,
                "version": self.version,
                "format": self.format,
                "sha256": self.sha256,
                "length": self.length,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "quantization": self.quantization,
                "created": format_time(self.created),
                "expires": format_time(self.expires),
                "hardware_tags": sorted(set(self.hardware_tags)),
                "metadata": dict(self.metadata),
            }
        )
        if self.health_check is not None:
            obj["health_check"] = self.health_check.to_dict()
        if self.reference is not None:
            obj["reference"] = self.reference.to_dict()
        if self.lineage is not None:
            obj["lineage"] = self.lineage.to_dict()
        return obj

    def to_bytes(self) -> bytes:
        """The canonical encoding: the bytes that are signed."""
        return encode_canonical(self.to_dict(), ManifestError, what="manifest")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse canonical manifest bytes, strictly.

        Raises:
            ManifestError: too large, not JSON, schema violations, or not canonical.
        """
        return decode_canonical(
            data,
            ManifestError,
            what="manifest",
            max_bytes=MAX_MANIFEST_BYTES,
            build=cls.from_dict,
            encode=Manifest.to_bytes,
        )

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Manifest:
        """Build a manifest from its JSON form, checking every known field.

        Raises:
            ManifestError: a missing or invalid field, or an unsupported schema.
        """
        r = FieldReader(obj, ManifestError, "manifest")
        schema = r.integer("schema", lo=1)
        if schema > SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema {schema} is newer than this fedge understands ({SCHEMA_VERSION})"
            )
        created = parse_time(r.text("created", max_len=20))
        expires = parse_time(r.text("expires", max_len=20))
        if expires <= created:
            raise ManifestError("manifest expires before it was created")
        meta = r.obj("metadata", optional=True)
        metadata: dict[str, str] = {}
        if meta is not None:
            if len(meta.keys()) > MAX_METADATA:
                raise r.fail("metadata", f"more than {MAX_METADATA} entries")
            for key in meta.keys():  # noqa: SIM118 - a FieldReader, not a dict
                if not 1 <= len(key) <= 64:
                    raise r.fail("metadata", f"key {key[:70]!r} must be 1-64 characters")
                metadata[key] = meta.text(key, max_len=1024)
        health = r.obj("health_check", optional=True)
        tags = r.texts(
            "hardware_tags", max_len=MAX_TAGS, max_item_len=64, pattern=TAG_RE, optional=True
        )
        inputs = tuple(
            TensorSpec.from_reader(r.wrap(f"inputs[{i}]", t))
            for i, t in enumerate(r.items("inputs", max_len=MAX_TENSORS))
        )
        outputs = tuple(
            TensorSpec.from_reader(r.wrap(f"outputs[{i}]", t))
            for i, t in enumerate(r.items("outputs", max_len=MAX_TENSORS))
        )
        if not inputs or not outputs:
            raise ManifestError("manifest must declare at least one input and one output")
        reference = r.obj("reference", optional=True)
        profile = None if reference is None else ReferenceProfile.from_reader(reference)
        if profile is not None:
            _check_profile_fits(profile, inputs[0])
        lineage_r = r.obj("lineage", optional=True)
        lineage = None if lineage_r is None else Lineage.from_reader(lineage_r, obj["lineage"])
        manifest = object.__new__(cls)
        values = {
            "name": r.text("name", max_len=64, pattern=NAME_RE),
            "version": r.integer("version", lo=1, hi=2**53),
            "format": r.text("format", max_len=16, choices=FORMATS),
            "sha256": r.text("sha256", max_len=64, pattern=SHA256_RE),
            "length": r.integer("length", lo=1, hi=MAX_PAYLOAD_BYTES),
            "inputs": inputs,
            "outputs": outputs,
            "quantization": r.text("quantization", max_len=32, choices=QUANTIZATIONS),
            "created": created,
            "expires": expires,
            "hardware_tags": tuple(sorted(set(tags))),
            "health_check": None if health is None else HealthCheck.from_reader(health),
            "metadata": metadata,
            "extra": {k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
            "schema": schema,
            "reference": profile,
            "lineage": lineage,
        }
        # Bypass __post_init__ (which calls from_dict) while keeping the class frozen.
        for key, value in values.items():
            object.__setattr__(manifest, key, value)
        return manifest

    def summary(self) -> str:
        """One line for logs: ``name v3 (onnx, int8-dynamic, 312 KiB)``."""
        return (
            f"{self.name} v{self.version} ({self.format}, {self.quantization}, "
            f"{self.length / 1024:.0f} KiB)"
        )
