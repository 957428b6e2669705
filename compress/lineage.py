"""Lineage: where a packaged model came from, carried in its signed manifest.

A :class:`Lineage` record answers "what produced this model, and what does it
replace?": the federated run (its id, how many rounds, the strategy and update codec,
how many devices took part), the data window the run trained on, the parent model
(name, version and payload sha256 of the artifact it was trained from or replaces),
what started it (:class:`Trigger`: an operator by hand, or a retraining policy with
its name, the drift score that fired it and a reason) and the code that built it
(:class:`CodeVersion`: the fedge version and, when known, the git commit).

Workflow: the coordinator builds a record when it packages a model
(``coordinator.delivery.lineage``) and puts it in the manifest's optional
``lineage`` field (:mod:`compress.manifest`), so it is signed with the model and
travels with it into the service's store; ``fedge model lineage NAME`` follows the
``parent`` links from the newest artifact back to the first one.

The JSON form is strict: every key is always present (``null`` when unknown), nothing
else is allowed, strings are bounded and patterned, numbers are finite and in range,
and those bounds keep the encoded record under :data:`MAX_LINEAGE_BYTES` (2 KiB; the
largest valid record is about 1.6 KiB), so it cannot crowd a manifest out of its size
limit. Pure values: no I/O.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from compress.errors import LineageError
from compress.strictjson import FieldReader, JsonObject, encode_canonical

__all__ = [
    "MAX_LINEAGE_BYTES",
    "CodeVersion",
    "DataWindow",
    "Lineage",
    "ParentRef",
    "Trigger",
]

logger = logging.getLogger(__name__)

#: An upper bound of any valid record's canonical JSON bytes (the field bounds keep it).
MAX_LINEAGE_BYTES = 2048
#: The largest integer fields (rounds, participants, versions) a record holds.
MAX_COUNT = 10**9
#: The largest drift score a policy trigger records.
MAX_DRIFT = 1e6

# The manifest's model-name and sha256 rules (compress.manifest imports this module,
# so they are spelled here and manifest.py reuses them).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
COMMIT_RE = re.compile(r"[0-9a-f]{7,40}")
VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,31}")
MAX_REASON = 256
#: A reason is free text for people, on one line: no control characters.
REASON_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f]*")

TriggerKind = Literal["manual", "policy"]
_TRIGGER_KINDS: tuple[TriggerKind, ...] = ("manual", "policy")


@dataclass(frozen=True)
class Trigger:
    """What started the model: ``manual`` (an operator), or a retraining ``policy``.

    A policy trigger names the policy, the drift score that fired it (None when the
    trigger was not a drift score, e.g. a feedback-accuracy drop) and a short reason.
    """

    kind: TriggerKind = "manual"
    policy: str | None = None
    drift: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        Trigger.from_dict(self.to_dict())

    @classmethod
    def manual(cls) -> Trigger:
        """An operator packaged the model by hand."""
        return cls()

    @classmethod
    def by_policy(cls, policy: str, *, drift: float | None, reason: str) -> Trigger:
        """A retraining policy started the run that produced the model."""
        return cls(kind="policy", policy=policy, drift=drift, reason=reason)

    def to_dict(self) -> JsonObject:
        """``{"kind": "manual"}`` or ``{"kind": "policy", "policy", "drift", "reason"}``."""
        if self.kind == "manual":
            return {"kind": "manual"}
        return {"kind": "policy", "policy": self.policy, "drift": self.drift,
                "reason": self.reason}  # fmt: skip

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Trigger:
        """Parse a trigger strictly.

        Raises:
            LineageError: an unknown kind, missing or extra keys, or a bad value.
        """
        return cls.from_reader(FieldReader(obj, LineageError, "trigger"), obj)

    @classmethod
    def from_reader(cls, r: FieldReader, obj: Mapping[str, Any]) -> Trigger:
        """Parse a trigger with ``r`` (over ``obj``), raising ``r``'s error class."""
        kind = r.text("kind", max_len=16, choices=_TRIGGER_KINDS)
        if kind == "manual":
            _exact_keys(r, obj, {"kind"})
            trigger = object.__new__(cls)
            for key, value in (("kind", "manual"), ("policy", None), ("drift", None),
                               ("reason", "")):  # fmt: skip
                object.__setattr__(trigger, key, value)
            return trigger
        _exact_keys(r, obj, {"kind", "policy", "drift", "reason"})
        drift = r.raw("drift")
        trigger = object.__new__(cls)
        values: dict[str, Any] = {
            "kind": "policy",
            "policy": r.text("policy", max_len=64, pattern=WORD_RE),
            "drift": None if drift is None else r.number("drift", lo=0.0, hi=MAX_DRIFT),
            "reason": r.text("reason", max_len=MAX_REASON, pattern=REASON_RE),
        }
        for key, value in values.items():  # frozen; __post_init__ would recurse
            object.__setattr__(trigger, key, value)
        return trigger

    def describe(self) -> str:
        """``manual`` or ``policy P (drift 0.31): reason``."""
        if self.kind == "manual":
            return "manual"
        drift = "" if self.drift is None else f" (drift {self.drift:.3g})"
        reason = f": {self.reason}" if self.reason else ""
        return f"policy {self.policy}{drift}{reason}"


@dataclass(frozen=True)
class ParentRef:
    """The model this one was trained from or replaces: name, version, payload sha256."""

    name: str
    version: int
    sha256: str

    def to_dict(self) -> JsonObject:
        """JSON form."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def describe(self) -> str:
        """``name v3 (sha256 0123abcd...)``."""
        return f"{self.name} v{self.version} (sha256 {self.sha256[:12]}...)"


@dataclass(frozen=True)
class DataWindow:
    """The span of device data a run trained on, as unix seconds (``start <= end``)."""

    start: int
    end: int

    def to_dict(self) -> JsonObject:
        """JSON form."""
        return {"start": self.start, "end": self.end}


@dataclass(frozen=True)
class CodeVersion:
    """The fedge version that packaged the model and the git commit, if known."""

    fedge: str
    commit: str | None = None

    def to_dict(self) -> JsonObject:
        """JSON form."""
        return {"fedge": self.fedge, "commit": self.commit}

    def describe(self) -> str:
        """``fedge 0.1.0 (0123abcd)`` or ``fedge 0.1.0``."""
        return f"fedge {self.fedge}" + (f" ({self.commit[:12]})" if self.commit else "")


_KEYS = frozenset(
    {"trigger", "run_id", "rounds", "strategy", "codec", "participants", "window", "parent",
     "code"}
)  # fmt: skip


@dataclass(frozen=True)
class Lineage:
    """Where a model came from. Fields a manual packaging does not know are None.

    Attributes:
        trigger: What started it (:class:`Trigger`).
        code: The code that packaged it (:class:`CodeVersion`).
        run_id: The federated run that trained it (service runs: ``run-...``).
        rounds: Rounds the run completed.
        strategy: The aggregation strategy (``fedavg``, ``fedprox`` ...).
        codec: The update codec (``fp32``, ``int8``, ``topk:0.1`` ...).
        participants: The most devices whose updates were aggregated in one round.
        window: The data window the run trained on.
        parent: The model it was trained from or replaces.
    """

    trigger: Trigger
    code: CodeVersion
    run_id: str | None = None
    rounds: int | None = None
    strategy: str | None = None
    codec: str | None = None
    participants: int | None = None
    window: DataWindow | None = None
    parent: ParentRef | None = None

    def __post_init__(self) -> None:
        Lineage.from_dict(self.to_dict())

    def to_dict(self) -> JsonObject:
        """JSON form: every key present, ``null`` when unknown."""
        return {
            "trigger": self.trigger.to_dict(),
            "code": self.code.to_dict(),
            "run_id": self.run_id,
            "rounds": self.rounds,
            "strategy": self.strategy,
            "codec": self.codec,
            "participants": self.participants,
            "window": None if self.window is None else self.window.to_dict(),
            "parent": None if self.parent is None else self.parent.to_dict(),
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes."""
        return encode_canonical(self.to_dict(), LineageError, what="lineage")

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Lineage:
        """Build a record from its JSON form, strictly (see the module docstring).

        Raises:
            LineageError: a missing, extra or invalid field.
        """
        try:
            return cls.from_reader(FieldReader(obj, LineageError, "lineage"), obj)
        except LineageError as exc:
            logger.warning("refused a lineage record: %s", exc)
            raise

    @classmethod
    def from_reader(cls, r: FieldReader, obj: Mapping[str, Any]) -> Lineage:
        """Parse a record with ``r`` (over ``obj``), raising ``r``'s error class.

        Raises:
            LineageError: (or ``r``'s error class) as :meth:`from_dict`.
        """
        _exact_keys(r, obj, _KEYS)
        trigger_r = r.req_obj("trigger")
        code_r = r.req_obj("code")
        _exact_keys(code_r, obj["code"], {"fedge", "commit"})
        window_r = r.obj("window", optional=True)
        parent_r = r.obj("parent", optional=True)
        window = None
        if window_r is not None:
            _exact_keys(window_r, obj["window"], {"start", "end"})
            start = window_r.integer("start", lo=0, hi=2**40)
            end = window_r.integer("end", lo=0, hi=2**40)
            if end < start:
                raise r.fail("window", "end is before start")
            window = DataWindow(start=start, end=end)
        parent = None
        if parent_r is not None:
            _exact_keys(parent_r, obj["parent"], {"name", "version", "sha256"})
            parent = ParentRef(
                name=parent_r.text("name", max_len=64, pattern=NAME_RE),
                version=parent_r.integer("version", lo=1, hi=2**53),
                sha256=parent_r.text("sha256", max_len=64, pattern=SHA256_RE),
            )
        lineage = object.__new__(cls)
        values = {
            "trigger": Trigger.from_reader(trigger_r, obj["trigger"]),
            "code": CodeVersion(
                fedge=code_r.text("fedge", max_len=32, pattern=VERSION_RE),
                commit=code_r.opt_text("commit", max_len=40, pattern=COMMIT_RE),
            ),
            "run_id": r.opt_text("run_id", max_len=64, pattern=RUN_ID_RE),
            "rounds": r.opt_integer("rounds", lo=0, hi=MAX_COUNT),
            "strategy": r.opt_text("strategy", max_len=64, pattern=WORD_RE),
            "codec": r.opt_text("codec", max_len=64, pattern=WORD_RE),
            "participants": r.opt_integer("participants", lo=0, hi=MAX_COUNT),
            "window": window,
            "parent": parent,
        }
        for key, value in values.items():  # frozen; __post_init__ would recurse
            object.__setattr__(lineage, key, value)
        return lineage

    def summary(self) -> str:
        """One line: ``run run-ab12 (5 rounds, fedavg, int8, 8 devices), policy ...``."""
        parts = []
        if self.run_id is not None or self.rounds is not None:
            details = [
                f"{self.rounds} rounds" if self.rounds is not None else None,
                self.strategy,
                self.codec,
                f"{self.participants} devices" if self.participants is not None else None,
            ]
            shown = ", ".join(d for d in details if d)
            parts.append(f"run {self.run_id or '-'}" + (f" ({shown})" if shown else ""))
        parts.append(f"trigger {self.trigger.describe()}")
        parts.append(f"parent {self.parent.describe() if self.parent else '-'}")
        parts.append(self.code.describe())
        return ", ".join(parts)


def _exact_keys(r: FieldReader, obj: Any, allowed: set[str] | frozenset[str]) -> None:
    """Every key of ``allowed`` present (null allowed) and no other.

    Raises:
        r's error class: a missing or an unknown key.
    """
    if not isinstance(obj, Mapping):
        raise r.fail("", "expected an object")
    keys = set(obj)
    for key in sorted(allowed - keys):
        raise r.fail(key, "missing")
    for key in sorted(keys - allowed):
        raise r.fail(key[:40], "unknown field")
