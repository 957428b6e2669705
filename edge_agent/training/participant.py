"""Taking part in federated rounds on a device.

The agent's worker thread hands :class:`Participant` the ``train_task`` commands
and the chunks of round weights. A task, as the device sees it::

    cmd: train_task ──(no local data, unknown family or codec)──> error (ref = task id)
            │ weights already held (the previous task used them)
            │     └──> task_ack has_weights=true ──> run
            │ else: subscribe fedge/v1/broadcast/<weights id>, task_ack
    chunks (broadcast, or own "chunks" topic for repairs), kept in memory
            │ nothing for stall_timeout_s: chunk_request for the missing ones
            │ (MAX_STALLS fruitless requests, or the deadline passed: dropped)
    complete: sha256 checked, arrays decoded ──> run
    run: train ──> update = new - global, encoded with the task's codec (top-k
               residual loaded from and saved to disk) ──> update_report
               (inline, or as a chunked upload on "events" when too big)
         evaluate ──> eval_report (loss, accuracy on the local held-out split)

The raw data never leaves the device: only the encoded update and counts do. A new
task replaces an unfinished one (the coordinator has moved on). The last weights
received stay in memory, so a train task that follows an evaluation of the same
weights starts without a download.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.codecs import encode_update, layout_of, parse_codec
from compress.errors import CompressError
from edge_agent.errors import AgentError, ProtocolError
from edge_agent.protocol import (
    Chunk,
    ChunkRequest,
    ErrorReport,
    EvalReport,
    Limits,
    Message,
    TaskAck,
    TaskAction,
    TrainTask,
    UpdateReport,
    broadcast_topic,
    chunk_count,
    decode_arrays,
    encode_arrays,
    sha256_hex,
)
from edge_agent.training.data import LocalData
from edge_agent.training.numpy_trainers import trainer_for
from edge_agent.training.residuals import ResidualStore
from edge_agent.training.trainer import TrainConfig
from edge_agent.transport.link import DeviceLink

__all__ = ["MAX_STALLS", "UPDATE_ARRAY", "Participant"]

logger = logging.getLogger(__name__)

UPDATE_ARRAY = "update"
"""The one array of an update report: the codec payload as uint8."""
MAX_STALLS = 6
"""Chunk requests in a row without progress before a weights download is dropped."""
HEADER_ROOM = 4096
"""Bytes kept free for the header when deciding whether an update fits inline."""
MAX_METRICS = 32
"""Metrics an update report carries at most (they must fit in ``HEADER_ROOM``)."""
DEFAULT_MAX_WEIGHTS_BYTES = 256 * 1024 * 1024
"""Largest round weights a device downloads (they are held in memory)."""

Weights = dict[str, npt.NDArray[np.float32]]


@dataclass
class _Download:
    task: TrainTask
    buffer: bytearray
    count: int
    held: set[int] = field(default_factory=set)
    stalls: int = 0
    deadline: float = 0.0  # monotonic: ask for missing chunks then


class Participant:
    """One device's part in federated rounds (one thread only)."""

    def __init__(
        self,
        *,
        device_id: str,
        data: LocalData | None,
        link: DeviceLink,
        send: Callable[[Message], bool],
        residuals: ResidualStore,
        limits: Limits,
        stall_timeout_s: float = 5.0,
        holdout_fraction: float = 0.2,
        max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Wire the participant to the agent's link and event sender.

        Args:
            device_id: This device (mixed into training seeds).
            data: The local training data, or None (the device does not train).
            link: The agent's broker link (broadcast subscriptions).
            send: Publishes an event; False if it could not go out.
            residuals: Where top-k residuals persist.
            limits: Protocol limits (inline report size, chunk sizes).
            stall_timeout_s: Silence before missing chunks are requested.
            holdout_fraction: Local examples kept out of training for evaluation.
            max_weights_bytes: Larger round weights are refused (``too_large``).
            clock: Unix seconds.
        """
        self._device_id = device_id
        self._data = data
        self._link = link
        self._send = send
        self._residuals = residuals
        self._limits = limits
        self._stall_timeout_s = stall_timeout_s
        self._holdout = holdout_fraction
        self._max_weights_bytes = max_weights_bytes
        self._clock = clock
        self._download: _Download | None = None
        self._weights: tuple[str, Weights] | None = None  # (transfer id, arrays)
        # A top-k residual is saved only once the update that goes with it went out:
        # if the update is lost, what it carried must not be lost from the residual.
        self._pending_residual: tuple[str, Weights] | None = None
        self.completed = 0
        """Tasks answered with a report."""

    # ----------------------------------------------------------------- status

    def train_examples(self) -> int:
        """Local examples available for training (0 without data; never raises)."""
        if self._data is None:
            return 0
        described = self._data.describe()
        examples = described.get("examples", 0)
        return int(examples) if isinstance(examples, int) else 0

    # ------------------------------------------------------------------ tasks

    def on_task(self, task: TrainTask) -> None:
        """Take a task: acknowledge it and get its weights, or refuse it."""
        logger.info("task %s (%s, round %s)", task.task_id[:8], task.action, task.round_id)
        self._drop_download()
        if task.deadline <= self._clock():
            logger.info("task %s arrived after its deadline (dropped)", task.task_id[:8])
            return
        refusal = self._refusal(task)
        if refusal is not None:
            self._fail(task, *refusal)
            return
        held = self._weights is not None and self._weights[0] == task.weights_transfer_id
        if held:
            self._send(TaskAck(round_id=task.round_id, task_id=task.task_id, has_weights=True))
            self._run(task)
            return
        count = chunk_count(task.weights_size, task.chunk_size)
        self._download = _Download(
            task,
            bytearray(task.weights_size),
            count,
            deadline=time.monotonic() + self._stall_timeout_s,
        )
        self._link.subscribe(broadcast_topic(task.weights_transfer_id))
        self._send(TaskAck(round_id=task.round_id, task_id=task.task_id, has_weights=False))

    def _refusal(self, task: TrainTask) -> tuple[str, str] | None:
        if self._data is None:
            return "no_data", "this device has no training data configured"
        if task.weights_size > self._max_weights_bytes:
            return "too_large", (
                f"round weights of {task.weights_size} bytes exceed this device's "
                f"{self._max_weights_bytes}"
            )
        try:
            trainer_for(task.family)
            if task.action is TaskAction.TRAIN:
                parse_codec(task.codec)
        except (AgentError, CompressError) as exc:
            return getattr(exc, "code", "training_error"), str(exc)
        return None

    # ---------------------------------------------------------------- weights

    def wants_broadcast(self, name: str) -> bool:
        """Whether a broadcast topic carries the weights being downloaded."""
        return self._download is not None and name == self._download.task.weights_transfer_id

    def on_chunk(self, chunk: Chunk) -> bool:
        """Keep a chunk of the weights being downloaded.

        Returns:
            Whether the chunk belonged to a weights download (else it is the
            updater's).
        """
        download = self._download
        if download is None or chunk.transfer_id != download.task.weights_transfer_id:
            return False
        task = download.task
        if chunk.total_size != task.weights_size or chunk.chunk_size != task.chunk_size:
            logger.warning("weights chunk %d does not fit the task (dropped)", chunk.index)
            return True
        if chunk.index not in download.held:
            download.buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
            download.held.add(chunk.index)
            download.stalls = 0
            download.deadline = time.monotonic() + self._stall_timeout_s
        if len(download.held) == download.count:
            self._complete(download)
        return True

    @property
    def deadline(self) -> float | None:
        """When (monotonic seconds) :meth:`on_deadline` wants to run, if ever."""
        return self._download.deadline if self._download is not None else None

    def on_deadline(self) -> None:
        """No chunk for a while: ask for the missing ones, or give up."""
        download = self._download
        if download is None:
            return
        download.stalls += 1
        if download.stalls > MAX_STALLS or download.task.deadline <= self._clock():
            logger.warning("weights for task %s never arrived (dropped)", download.task.task_id[:8])
            self._drop_download()
            return
        self._request_missing(download)

    def on_connected(self) -> None:
        """Back online: ask for what is still missing."""
        if self._download is not None:
            self._request_missing(self._download)

    def _request_missing(self, download: _Download) -> None:
        download.deadline = time.monotonic() + self._stall_timeout_s
        missing = [i for i in range(download.count) if i not in download.held]
        wanted = tuple(missing[: self._limits.max_list_items])
        if wanted:
            self._send(ChunkRequest(transfer_id=download.task.weights_transfer_id, indices=wanted))

    def _drop_download(self) -> None:
        if self._download is not None:
            self._link.unsubscribe(broadcast_topic(self._download.task.weights_transfer_id))
            self._download = None

    def _complete(self, download: _Download) -> None:
        task = download.task
        self._drop_download()
        payload = bytes(download.buffer)
        if sha256_hex(payload) != task.weights_transfer_id:
            self._fail(task, "payload_hash", "the round's weights do not match their sha256")
            return
        try:
            arrays = decode_arrays(task.weights_index, payload, limits=self._limits)
        except ProtocolError as exc:
            self._fail(task, exc.code, f"the round's weights cannot be decoded: {exc}")
            return
        weights = {name: np.array(value, dtype=np.float32) for name, value in arrays.items()}
        self._weights = (task.weights_transfer_id, weights)
        self._run(task)

    # -------------------------------------------------------------------- run

    def _run(self, task: TrainTask) -> None:
        if self._weights is None or self._data is None:
            return
        weights = self._weights[1]
        try:
            config = TrainConfig.from_mapping(task.config)
            train, held_out = self._data.split(self._holdout, seed=config.seed)
            trainer = trainer_for(task.family)
            if task.action is TaskAction.EVALUATE:
                result = trainer.evaluate(weights, held_out if len(held_out) else train)
                self._report(
                    EvalReport(
                        round_id=task.round_id,
                        task_id=task.task_id,
                        num_examples=result.num_examples,
                        metrics=result.metrics(),
                    )
                )
                return
            started = time.monotonic()
            self._pending_residual = None
            fitted = trainer.fit(weights, train, config, config.rng(task.round_id, self._device_id))
            metrics = dict(fitted.metrics)
            metrics["train_seconds"] = time.monotonic() - started
            update = self._encode(task, config, weights, fitted.weights)
        except (AgentError, CompressError) as exc:
            self._fail(task, getattr(exc, "code", "training_error"), str(exc))
            return
        if self._send_update(task, fitted.num_examples, metrics, update):
            self._commit_residual()

    def _commit_residual(self) -> None:
        pending, self._pending_residual = self._pending_residual, None
        if pending is None:
            return
        try:
            self._residuals.save(*pending)
        except AgentError as exc:
            logger.error("the top-k residual of %s was not saved: %s", pending[0], exc)

    def _encode(
        self, task: TrainTask, config: TrainConfig, weights: Weights, trained: Mapping[str, Any]
    ) -> npt.NDArray[np.uint8]:
        """``trained - weights`` through the task's codec.

        A top-k codec starts from the stored residual; the new one is kept pending
        until the update has gone out (:meth:`_commit_residual`).

        Raises:
            CodecError: an invalid codec or a non-finite update.
        """
        spec = parse_codec(task.codec)
        delta = {
            name: np.asarray(trained[name], dtype=np.float32) - weights[name] for name in weights
        }
        residual = self._residuals.load(task.model, layout_of(weights)) if spec.is_topk else None
        rng = config.rng(task.round_id, self._device_id, "codec")
        encoded = encode_update(delta, spec, rng=rng, residual=residual)
        if encoded.residual is not None:
            self._pending_residual = (task.model, encoded.residual)
        return np.frombuffer(encoded.payload, dtype=np.uint8)

    def _send_update(
        self,
        task: TrainTask,
        examples: int,
        metrics: Mapping[str, float],
        update: npt.NDArray[np.uint8],
    ) -> bool:
        """Send the update inline, or as an upload when it is too big for one message.

        Returns:
            Whether the report went out.
        """
        finite = {k: float(v) for k, v in sorted(metrics.items()) if np.isfinite(v)}
        if len(finite) > MAX_METRICS:
            logger.info("reporting %d of %d metrics", MAX_METRICS, len(finite))
        common = {
            "round_id": task.round_id,
            "task_id": task.task_id,
            "num_examples": examples,
            "codec": task.codec,
            "metrics": dict(list(finite.items())[:MAX_METRICS]),
        }
        if update.nbytes + HEADER_ROOM <= self._limits.max_message_bytes:
            return self._report(UpdateReport(**common, arrays={UPDATE_ARRAY: update}))  # type: ignore[arg-type]
        index, body = encode_arrays({UPDATE_ARRAY: update}, limits=self._limits)
        transfer_id = sha256_hex(body)
        chunk_size = self._limits.default_chunk_bytes
        for i in range(chunk_count(len(body), chunk_size)):
            chunk = Chunk.from_payload(body, i, chunk_size=chunk_size, transfer_id=transfer_id)
            if not self._send(chunk):
                logger.warning("upload of task %s interrupted (disconnected)", task.task_id[:8])
                return False
        report = UpdateReport(**common, upload_transfer_id=transfer_id, upload_index=index)  # type: ignore[arg-type]
        return self._report(report)

    def _report(self, message: Message) -> bool:
        if self._send(message):
            self.completed += 1
            return True
        logger.warning("could not send the %s (disconnected)", message.TYPE)
        return False

    def _fail(self, task: TrainTask, code: str, reason: str) -> None:
        logger.warning("task %s failed: %s: %s", task.task_id[:8], code, reason)
        self._send(ErrorReport(code=code, message=reason[:1000], ref=task.task_id))
