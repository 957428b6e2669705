"""The common ground of the typed messages: the base class and the field rules.

:class:`Message` is what every message type derives from (its ``TYPE``, the
channels it may travel on, and its ``_to_wire`` / ``_from_wire`` pair);
:mod:`edge_agent.protocol.messages` encodes and decodes them and holds the
registry. The message families live beside this module:
:mod:`~edge_agent.protocol.messages_status` (presence and telemetry),
:mod:`~edge_agent.protocol.messages_delivery` (deploy, chunks, install status) and
:mod:`~edge_agent.protocol.messages_rounds` (federated tasks and reports);
:class:`ErrorReport`, which either side sends about anything, is here.

The helpers below read the fields every family shares, with these identifier
rules: *ident* is 1-64 of ``[A-Za-z0-9_.-]`` starting with a letter or digit
(model names, deployment/round/task ids, runtimes, families; safe as file names);
*key* is 1-64 of ``[A-Za-z0-9_.:/-]`` starting with a letter, digit or ``_`` (keys
of hardware, config and metrics); *code* is 1-64 of ``[a-z0-9_.]`` starting with a
letter. A ``transfer_id`` is the sha256 (64 lowercase hex) of the whole transferred
payload, so every assembled transfer is verifiable, and each chunk carries its own
sha256.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from compress.strictjson import FieldReader
from edge_agent.errors import MalformedMessageError
from edge_agent.protocol.limits import MAX_SAFE_INT, Limits
from edge_agent.protocol.topics import Channel

PROTOCOL_VERSION = 1
"""The header schema version (``v``) this side writes and the highest it reads."""

IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,63}")
CODE_RE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
CODEC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+=,-]{0,127}")
AGENT_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+!-]{0,63}")
TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
HEX32_RE = re.compile(r"[0-9a-f]{32}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
MODEL_SPEC_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
)
"""A model factory: ``module.path:function`` (see :mod:`edge_agent.training.model_spec`)."""
MODEL_SPEC_MAX_CHARS = 200


# --------------------------------------------------------------------------- helpers


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hash bytes the way transfer ids and chunk digests are formed.

    Args:
        data: The bytes.

    Returns:
        The sha256 digest as 64 lowercase hex characters.
    """
    return hashlib.sha256(data).hexdigest()


def new_message_id() -> str:
    """Draw a fresh random message id.

    Returns:
        32 lowercase hex characters (a uuid4).
    """
    return uuid.uuid4().hex


def chunk_count(total_size: int, chunk_size: int) -> int:
    """Count the chunks a payload splits into.

    An empty payload still travels as one (empty) chunk.

    Args:
        total_size: Payload length in bytes (>= 0).
        chunk_size: Chunk length in bytes (>= 1).

    Returns:
        ``max(1, ceil(total_size / chunk_size))``.

    Raises:
        MalformedMessageError: ``total_size`` < 0 or ``chunk_size`` < 1.
    """
    if total_size < 0 or chunk_size < 1:
        raise MalformedMessageError("chunk_count needs total_size >= 0 and chunk_size >= 1")
    return max(1, -(-total_size // chunk_size))


def read_scalars(
    data: FieldReader, key: str, limits: Limits, *, bools: bool = False
) -> dict[str, str | int | float | bool]:
    """A mapping of str (free text), int or finite float; bool only if ``bools``."""

    def scalar(r: FieldReader, name: str) -> str | int | float | bool:
        value = r.raw(name)
        if type(value) is bool and bools:
            return value
        if type(value) is int:
            return r.integer(name, lo=-MAX_SAFE_INT)
        if type(value) is float:
            return r.number(name, lo=-math.inf)
        if type(value) is str:
            return r.text(name, max_len=limits.max_string_chars)
        raise r.fail(name, f"expected a string or a number, got {type(value).__name__}")

    return data.mapping(key, scalar, max_len=limits.max_dict_items, key_pattern=KEY_RE)


def read_model_info(models: FieldReader, key: str) -> ModelInfo:
    model = models.req_obj(key)
    return ModelInfo(
        name=model.text("name", pattern=IDENT_RE),
        version=model.integer("version"),
        sha256=model.text("sha256", pattern=HEX64_RE),
    )


def read_metrics(data: FieldReader, limits: Limits) -> dict[str, float]:
    """The ``metrics`` mapping of a report: *key* -> finite float."""
    return data.mapping(
        "metrics",
        lambda r, key: r.number(key, lo=-math.inf),
        max_len=limits.max_dict_items,
        key_pattern=KEY_RE,
    )


def check_no_body(body: bytes, type_name: str) -> None:
    if body:
        raise MalformedMessageError(f"a {type_name} message carries no body, got {len(body)} bytes")


# -------------------------------------------------------------------------- messages


class Message(ABC):
    """Base class of every message type.

    Subclasses are frozen, keyword-only dataclasses with these class attributes:

    Attributes:
        TYPE: The header's ``type`` string.
        CHANNELS: The per-device channels the type may travel on.
        BROADCAST: Whether it may also travel on broadcast topics.
    """

    TYPE: ClassVar[str]
    CHANNELS: ClassVar[frozenset[Channel]]
    BROADCAST: ClassVar[bool] = False

    @abstractmethod
    def _to_wire(self, limits: Limits) -> tuple[dict[str, Any], bytes]:
        """Give the header ``data`` object and the body.

        Args:
            limits: Bounds to respect while serialising (arrays).

        Returns:
            ``(data, body)``.
        """

    @classmethod
    @abstractmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        """Build the message from a checked header ``data`` object and the body.

        Args:
            data: The ``data`` object.
            body: The frame's body.
            limits: Bounds to enforce.

        Returns:
            The message.

        Raises:
            ProtocolError: A field is missing, malformed or over a limit.
        """


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model installed on a device.

    Attributes:
        name: Model name (*ident*).
        version: Installed version (>= 0).
        sha256: sha256 of the installed model file.
    """

    name: str
    version: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class ErrorReport(Message):
    """An error either side reports to the other (``events`` or ``cmd``).

    Attributes:
        code: Stable error *code* (e.g. an :class:`~edge_agent.errors.AgentError`
            ``code``).
        message: Human-readable text (free text).
        ref: Id of the message this error refers to, if any.
    """

    TYPE: ClassVar[str] = "error"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS, Channel.CMD})

    code: str
    message: str = ""
    ref: str | None = None

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        return {"code": self.code, "message": self.message, "ref": self.ref}, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        check_no_body(body, cls.TYPE)
        return cls(
            code=data.text("code", pattern=CODE_RE),
            message=data.text("message", max_len=limits.max_string_chars),
            ref=data.opt_text("ref", pattern=HEX32_RE),
        )
