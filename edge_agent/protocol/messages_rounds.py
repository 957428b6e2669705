"""Messages of a federated round, in the order they flow.

1. The coordinator sends :class:`TrainTask` (a :class:`TaskAction`: train or
   evaluate; the weights' transfer id and array index, the codec, a config) on a
   device's ``cmd`` channel; the weights travel as broadcast chunks
   (:mod:`edge_agent.protocol.messages_delivery`).
2. The device answers :class:`TaskAck`, then :class:`UpdateReport` (the encoded
   update inline as arrays, or uploaded as chunks) or :class:`EvalReport`; a task
   it cannot do gets an :class:`~edge_agent.protocol.messages_base.ErrorReport`.

Field rules and the base class: :mod:`edge_agent.protocol.messages_base`;
encoding: :mod:`edge_agent.protocol.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self

import numpy.typing as npt

from compress.strictjson import FieldReader
from edge_agent.errors import (
    MalformedMessageError,
    MessageTooLargeError,
)
from edge_agent.protocol.arrays import (
    ArrayEntry,
    arrays_equal,
    decode_arrays,
    encode_arrays,
    index_to_json,
    parse_array_index,
)
from edge_agent.protocol.limits import Limits
from edge_agent.protocol.messages_base import (
    CODEC_RE,
    HEX32_RE,
    HEX64_RE,
    IDENT_RE,
    MODEL_SPEC_MAX_CHARS,
    MODEL_SPEC_RE,
    Message,
    check_no_body,
    read_metrics,
    read_scalars,
)
from edge_agent.protocol.topics import Channel


class TaskAction(StrEnum):
    """What a :class:`TrainTask` asks for."""

    TRAIN = "train"
    EVALUATE = "evaluate"


@dataclass(frozen=True, kw_only=True)
class TrainTask(Message):
    """Command: train (or evaluate) locally on a round's global weights.

    The weights travel once per round for all devices: a chunked transfer of
    ``weights_transfer_id`` (the payload is the concatenated ``.npy`` blobs that
    ``weights_index`` splits, see :mod:`edge_agent.protocol.arrays`), broadcast on
    ``fedge/v1/broadcast/<weights_transfer_id>``; a device asks with
    ``chunk_request`` for what it lacks. A device that already holds the payload
    (the previous task used the same weights) starts at once.

    The answer is an :class:`UpdateReport` (train), an :class:`EvalReport`
    (evaluate) or an :class:`ErrorReport` whose ``ref`` is ``task_id``.

    Attributes:
        round_id: The round (*ident*).
        task_id: This device's task in the round (32 lowercase hex).
        action: Train or evaluate.
        model: Model name (*ident*).
        family: Model family (*ident*, e.g. ``softmax``, ``mlp``).
        weights_transfer_id: sha256 of the weights payload.
        weights_size: Weights payload length (<= ``limits.max_transfer_bytes``);
            the lengths in ``weights_index`` add up to it.
        weights_index: Names and ``.npy`` lengths of the weights, in order.
        chunk_size: Bytes per chunk of the weights transfer.
        codec: Update codec spec (1-128 of ``[A-Za-z0-9_.:+=,-]``).
        deadline: Report by this time, unix seconds.
        config: Training settings, *key* -> int, float, str or bool.
        model_spec: For ``family="torch"``: the model factory ``module:function``
            the device must have installed (empty for the built-in families).
        task: ``classification``, ``regression`` or ``reconstruction``.
        model_args: Keyword arguments of the factory, *key* -> int, float, str or
            bool (``input_shape`` as ``"1,28,28"``, ``num_outputs``).
    """

    TYPE: ClassVar[str] = "train_task"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.CMD})

    round_id: str
    task_id: str
    action: TaskAction = TaskAction.TRAIN
    model: str
    family: str
    weights_transfer_id: str
    weights_size: int
    weights_index: tuple[ArrayEntry, ...]
    chunk_size: int
    codec: str
    deadline: float
    config: dict[str, int | float | str | bool] = field(default_factory=dict)
    model_spec: str = ""
    task: str = "classification"
    model_args: dict[str, int | float | str | bool] = field(default_factory=dict)

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "round_id": self.round_id,
            "task_id": self.task_id,
            "action": str(self.action),
            "model": self.model,
            "family": self.family,
            "weights_transfer_id": self.weights_transfer_id,
            "weights_size": self.weights_size,
            "weights_index": index_to_json(self.weights_index),
            "chunk_size": self.chunk_size,
            "codec": self.codec,
            "deadline": self.deadline,
            "config": dict(self.config),
        }
        if self.family == "torch" or self.model_spec:
            data["model_spec"] = self.model_spec
            data["model_args"] = dict(self.model_args)
        if self.task != "classification":
            data["task"] = self.task
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        check_no_body(body, cls.TYPE)
        config = read_scalars(data, "config", limits, bools=True)
        model_args = (
            read_scalars(data, "model_args", limits, bools=True) if data.has("model_args") else {}
        )
        action_text = data.text("action", pattern=IDENT_RE)
        try:
            action = TaskAction(action_text)
        except ValueError:
            raise data.fail("action", f"unknown action {action_text!r}") from None
        size = data.integer("weights_size", limit=limits.max_transfer_bytes)
        index = parse_array_index(data.raw("weights_index"), limits=limits)
        if not index or sum(entry.length for entry in index) != size:
            raise data.fail("weights_index", "lengths must add up to weights_size")
        return cls(
            round_id=data.text("round_id", pattern=IDENT_RE),
            task_id=data.text("task_id", pattern=HEX32_RE),
            action=action,
            model=data.text("model", pattern=IDENT_RE),
            family=data.text("family", pattern=IDENT_RE),
            weights_transfer_id=data.text("weights_transfer_id", pattern=HEX64_RE),
            weights_size=size,
            weights_index=index,
            chunk_size=data.integer("chunk_size", lo=1, limit=limits.max_chunk_bytes),
            codec=data.text("codec", pattern=CODEC_RE),
            deadline=data.number("deadline"),
            config=config,
            model_spec=data.opt_text(
                "model_spec", max_len=MODEL_SPEC_MAX_CHARS, pattern=MODEL_SPEC_RE
            )
            or "",
            task=data.opt_text("task", pattern=IDENT_RE) or "classification",
            model_args=model_args,
        )


@dataclass(frozen=True, kw_only=True)
class TaskAck(Message):
    """Event: a device took a :class:`TrainTask` (sent before any download).

    The coordinator pushes the round's weights once, on their broadcast topic, after
    the devices that need them have acknowledged (so they have subscribed).

    Attributes:
        round_id: The round (*ident*).
        task_id: The task (32 lowercase hex).
        has_weights: The device already holds the task's weights (no download).
    """

    TYPE: ClassVar[str] = "task_ack"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS})

    round_id: str
    task_id: str
    has_weights: bool = False

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {"round_id": self.round_id, "task_id": self.task_id, "has_weights": self.has_weights}
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, _limits: Limits) -> Self:
        check_no_body(body, cls.TYPE)
        return cls(
            round_id=data.text("round_id", pattern=IDENT_RE),
            task_id=data.text("task_id", pattern=HEX32_RE),
            has_weights=data.boolean("has_weights"),
        )


@dataclass(frozen=True, kw_only=True)
class UpdateReport(Message):
    """Event: the result of a train task.

    Exactly one of two forms:

    * inline: ``arrays`` holds the encoded update; it travels in the body as
      ``.npy`` blobs indexed by ``data.arrays``;
    * uploaded (too big for one message): ``upload_transfer_id`` names a chunked
      upload (``chunk`` messages on ``events``) whose payload is the concatenated
      ``.npy`` blobs, and ``upload_index`` (sent as ``data.arrays``) splits it;
      decode that payload with
      ``decode_arrays(report.upload_index, payload, limits=...)``. The body is
      empty and the index's lengths must add up to at most
      ``limits.max_transfer_bytes``.

    Equality compares arrays by name, shape, dtype and bytes.

    Attributes:
        round_id: The round (*ident*).
        task_id: The task (32 lowercase hex).
        num_examples: Examples trained on.
        metrics: Training metrics, *key* -> finite float.
        codec: The codec the arrays were encoded with.
        arrays: Inline arrays by name (read-only after decoding), or None.
        upload_transfer_id: sha256 of the uploaded payload, or None.
        upload_index: Index of the uploaded payload (empty when inline).
    """

    TYPE: ClassVar[str] = "update_report"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS})

    round_id: str
    task_id: str
    num_examples: int
    codec: str
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, npt.NDArray[Any]] | None = None
    upload_transfer_id: str | None = None
    upload_index: tuple[ArrayEntry, ...] = ()

    def __eq__(self, other: object) -> bool:
        """Compare field by field, arrays by content.

        Args:
            other: Any value.

        Returns:
            Whether ``other`` is an equal UpdateReport.
        """
        if not isinstance(other, UpdateReport):
            return NotImplemented
        return (
            self.round_id == other.round_id
            and self.task_id == other.task_id
            and self.num_examples == other.num_examples
            and self.codec == other.codec
            and self.metrics == other.metrics
            and self.upload_transfer_id == other.upload_transfer_id
            and self.upload_index == other.upload_index
            and arrays_equal(self.arrays, other.arrays)
        )

    def __hash__(self) -> int:
        """Hash the identifying fields (consistent with ``__eq__``).

        Returns:
            A hash of ``(round_id, task_id)``.
        """
        return hash((self.round_id, self.task_id))

    def _to_wire(self, limits: Limits) -> tuple[dict[str, Any], bytes]:
        if (self.arrays is None) == (self.upload_transfer_id is None):
            raise MalformedMessageError(
                "an update_report needs exactly one of arrays and upload_transfer_id"
            )
        if self.arrays is not None:
            index, body = encode_arrays(self.arrays, limits=limits)
        else:
            index, body = self.upload_index, b""
        data = {
            "round_id": self.round_id,
            "task_id": self.task_id,
            "num_examples": self.num_examples,
            "codec": self.codec,
            "metrics": dict(self.metrics),
            "arrays": index_to_json(index),
            "upload_transfer_id": self.upload_transfer_id,
        }
        return data, body

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        metrics = read_metrics(data, limits)
        index = parse_array_index(data.raw("arrays"), limits=limits)
        upload = data.opt_text("upload_transfer_id", pattern=HEX64_RE)
        arrays: dict[str, npt.NDArray[Any]] | None = None
        upload_index: tuple[ArrayEntry, ...] = ()
        if upload is None:
            arrays = decode_arrays(index, body, limits=limits)
        else:
            check_no_body(body, f"{cls.TYPE} (uploaded)")
            if not index:
                raise data.fail("arrays", "an uploaded update needs a non-empty index")
            total = sum(entry.length for entry in index)
            if total > limits.max_transfer_bytes:
                raise MessageTooLargeError(
                    f"uploaded update of {total} bytes, limit {limits.max_transfer_bytes}"
                )
            upload_index = index
        return cls(
            round_id=data.text("round_id", pattern=IDENT_RE),
            task_id=data.text("task_id", pattern=HEX32_RE),
            num_examples=data.integer("num_examples"),
            codec=data.text("codec", pattern=CODEC_RE),
            metrics=metrics,
            arrays=arrays,
            upload_transfer_id=upload,
            upload_index=upload_index,
        )


@dataclass(frozen=True, kw_only=True)
class EvalReport(Message):
    """Event: the result of an evaluate task (metrics on local held-out data).

    Attributes:
        round_id: The round (*ident*).
        task_id: The task (32 lowercase hex).
        num_examples: Held-out examples evaluated.
        metrics: ``loss``, ``accuracy`` and any others, *key* -> finite float.
    """

    TYPE: ClassVar[str] = "eval_report"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS})

    round_id: str
    task_id: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "round_id": self.round_id,
            "task_id": self.task_id,
            "num_examples": self.num_examples,
            "metrics": dict(self.metrics),
        }
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        check_no_body(body, cls.TYPE)
        return cls(
            round_id=data.text("round_id", pattern=IDENT_RE),
            task_id=data.text("task_id", pattern=HEX32_RE),
            num_examples=data.integer("num_examples"),
            metrics=read_metrics(data, limits),
        )
