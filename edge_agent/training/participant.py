"""Taking part in federated rounds on a device.

The agent's worker thread hands :class:`Participant` the ``train_task`` commands
and the chunks of round weights. A task, as the device sees it::

    cmd: train_task ──(no local data, unknown family or codec, a torch model
            │          not on the allow list, no torch)──> error (ref = task id)
            │ weights already held (the previous task used them)
            │     └──> task_ack has_weights=true ──> run
            │ else: subscribe fedge/v1/broadcast/<weights id>, task_ack
    chunks (broadcast, or own "chunks" topic for repairs), kept in memory
            │ nothing for stall_timeout_s: chunk_request for the missing ones
            │ (MAX_STALLS fruitless requests, or the deadline passed: dropped)
    complete: sha256 checked, arrays decoded ──> run
    run (on the training thread): local data split for the task's learning task,
               train ──> update = new - global, encoded with the task's codec
               (the top-k residual is read before and saved after it went out)
               or evaluate
    poll (worker thread): update_report (inline, or as a chunked upload on
               "events" when too big), or eval_report (loss, accuracy or the
               task's metrics on the local held-out split), or error

Training runs off the agent's worker, on one
:class:`~edge_agent.training.training_thread.TrainingThread`, so that deploys, chunk
repairs and telemetry go on during a long epoch. The training thread only loads
data, trains or evaluates and encodes; everything else (the participant's state, the
link, the residual store, sending) stays on the worker, which takes finished results
with :meth:`Participant.poll` (the training thread calls ``wake`` when one is
ready).

Models: ``family`` names a built-in numpy trainer (or one registered with
:func:`~edge_agent.training.numpy_trainers.register_trainer`), or is ``"torch"``:
then ``model_spec`` names a PyTorch factory that must be on this device's allow list,
else the task is refused with ``unknown_model`` before anything is downloaded or
imported; a device without PyTorch refuses with ``no_torch``
(:class:`~edge_agent.training.task_model.DeviceModels`). PyTorch is imported only
when a torch task runs.

The raw data never leaves the device: only the encoded update and counts do. A new
task replaces an unfinished one (the coordinator has moved on): a download is
dropped, and the result of a training still running is dropped when it ends. The
last weights received stay in memory, so a train task that follows an evaluation of
the same weights starts without a download.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
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
from edge_agent.training.residuals import ResidualStore
from edge_agent.training.task_model import DeviceModels, TaskModel
from edge_agent.training.trainer import TrainConfig
from edge_agent.training.training_thread import TrainingThread
from edge_agent.transport.link import DeviceLink

__all__ = ["MAX_STALLS", "STOP_TIMEOUT_S", "UPDATE_ARRAY", "Participant"]

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
STOP_TIMEOUT_S = 5.0
"""How long :meth:`Participant.close` waits for a training that runs, then abandons it."""

Weights = dict[str, npt.NDArray[np.float32]]


@dataclass
class _Download:
    task: TrainTask
    buffer: bytearray
    count: int
    held: set[int] = field(default_factory=set)
    stalls: int = 0
    deadline: float = 0.0  # monotonic: ask for missing chunks then


@dataclass(frozen=True)
class _Update:
    """A trained update, encoded: what the worker sends."""

    num_examples: int
    metrics: dict[str, float]
    payload: npt.NDArray[np.uint8]
    residual: Weights | None


@dataclass(frozen=True)
class _Failure:
    code: str
    reason: str


_Outcome = _Update | EvalReport | _Failure


def _nothing() -> None:
    return None


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
        models: Iterable[str] = (),
        torch_threads: int | None = None,
        wake: Callable[[], None] = _nothing,
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
            models: The device owner's ``[training] models``: PyTorch model specs
                allowed besides the zoo and the ``fedge.models`` entry points.
            torch_threads: Threads PyTorch trains with (None: its default).
            wake: Called on the training thread when a result is ready for
                :meth:`poll` (the agent wakes its worker).
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
        self._models = DeviceModels(models, torch_threads=torch_threads)
        self._thread: TrainingThread[_Outcome] = TrainingThread(f"train-{device_id}", on_done=wake)
        self._running: tuple[int, TrainTask] | None = None  # (ticket, task) on the thread
        self._download: _Download | None = None
        self._weights: tuple[str, Weights] | None = None  # (transfer id, arrays)
        # A top-k residual is saved only once the update that goes with it went out:
        # if the update is lost, what it carried must not be lost from the residual.
        self._pending_residual: tuple[str, Weights] | None = None
        self.completed = 0
        """Tasks answered with a report."""

    # ----------------------------------------------------------------- status

    @property
    def train_models(self) -> tuple[str, ...]:
        """The model specs this device can train, for its status (see
        :attr:`DeviceModels.train_models`)."""
        return self._models.train_models

    def train_examples(self) -> int:
        """Local examples available for training (0 without data; never raises)."""
        if self._data is None:
            return 0
        described = self._data.describe()
        examples = described.get("examples", 0)
        return int(examples) if isinstance(examples, int) else 0

    # ------------------------------------------------------------------ tasks

    def on_task(self, task: TrainTask) -> None:
        """Take a task: acknowledge it and get its weights, or refuse it.

        The task that is training already (the coordinator sends it again to a
        device that reconnected) is acknowledged and goes on training.
        """
        logger.info("task %s (%s, round %s)", task.task_id[:8], task.action, task.round_id)
        if self._running is not None and self._running[1].task_id == task.task_id:
            self._send(TaskAck(round_id=task.round_id, task_id=task.task_id, has_weights=True))
            return
        self._drop_download()
        self._drop_running()
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
            self._models.check(task)
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
        """Hand the task to the training thread (its result comes back in :meth:`poll`)."""
        if self._weights is None or self._data is None:
            return
        weights = self._weights[1]
        data = self._data
        try:
            model = self._models.check(task)
            config = TrainConfig.from_mapping(task.config)
            residual = None
            if task.action is TaskAction.TRAIN and parse_codec(task.codec).is_topk:
                residual = self._residuals.load(task.model, layout_of(weights))
        except (AgentError, CompressError) as exc:
            self._fail(task, getattr(exc, "code", "training_error"), str(exc))
            return
        self._pending_residual = None

        def job() -> _Outcome:
            return self._work(
                task, model=model, config=config, data=data, weights=weights, residual=residual
            )

        self._running = (self._thread.submit(job), task)

    def _work(
        self,
        task: TrainTask,
        *,
        model: TaskModel,
        config: TrainConfig,
        data: LocalData,
        weights: Weights,
        residual: Weights | None,
    ) -> _Outcome:
        """Train or evaluate, and encode (training thread: touches no participant state)."""
        try:
            train, held_out = data.split(self._holdout, seed=config.seed, task=model.task)
            trainer = self._models.trainer(model)
            if task.action is TaskAction.EVALUATE:
                result = trainer.evaluate(weights, held_out if len(held_out) else train)
                return EvalReport(
                    round_id=task.round_id,
                    task_id=task.task_id,
                    num_examples=result.num_examples,
                    metrics=result.metrics(),
                )
            started = time.monotonic()
            fitted = trainer.fit(weights, train, config, config.rng(task.round_id, self._device_id))
            metrics = dict(fitted.metrics)
            metrics["train_seconds"] = time.monotonic() - started
            payload, new_residual = self._encode(task, config, weights, fitted.weights, residual)
        except (AgentError, CompressError) as exc:
            return _Failure(getattr(exc, "code", "training_error"), str(exc))
        return _Update(fitted.num_examples, metrics, payload, new_residual)

    # ------------------------------------------------------------ results

    def poll(self) -> None:
        """Send the report of a training that finished (worker thread; never blocks).

        A result whose task was replaced meanwhile is dropped, unsent.
        """
        for done in self._thread.take():
            running = self._running
            if running is None or running[0] != done.ticket:
                logger.info("a replaced task's training result was dropped")
                continue
            self._running = None
            task = running[1]
            outcome = done.result
            if done.error is not None or outcome is None:
                self._fail(task, "training_error", f"training failed: {done.error!r}")
            elif isinstance(outcome, _Failure):
                self._fail(task, outcome.code, outcome.reason)
            elif isinstance(outcome, EvalReport):
                self._report(outcome)
            else:
                if outcome.residual is not None:
                    self._pending_residual = (task.model, outcome.residual)
                if self._send_update(task, outcome.num_examples, outcome.metrics, outcome.payload):
                    self._commit_residual()

    @property
    def training(self) -> bool:
        """Whether a task's training or evaluation is under way."""
        return self._running is not None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the training thread has nothing to do (at most ``timeout`` s);
        :meth:`poll` then sends what it finished. Tests use it (the agent's worker
        never waits: it polls when the training thread wakes it).

        Returns:
            Whether it is idle.
        """
        return self._thread.wait_idle(timeout)

    def close(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop the training thread: a running training gets ``timeout`` seconds to
        end, then it is abandoned; its result is never sent. Idempotent.

        Returns:
            Whether the training thread has stopped.
        """
        self._running = None
        self._drop_download()
        return self._thread.close(timeout)

    def _drop_running(self) -> None:
        if self._running is not None:
            logger.info("task %s replaced while it trains", self._running[1].task_id[:8])
            self._running = None

    def _commit_residual(self) -> None:
        pending, self._pending_residual = self._pending_residual, None
        if pending is None:
            return
        try:
            self._residuals.save(*pending)
        except AgentError as exc:
            logger.error("the top-k residual of %s was not saved: %s", pending[0], exc)

    def _encode(
        self,
        task: TrainTask,
        config: TrainConfig,
        weights: Weights,
        trained: Mapping[str, Any],
        residual: Weights | None,
    ) -> tuple[npt.NDArray[np.uint8], Weights | None]:
        """``trained - weights`` through the task's codec.

        A top-k codec starts from ``residual`` (the stored one); the new residual is
        returned, and saved only once the update has gone out (:meth:`_commit_residual`).

        Raises:
            CodecError: an invalid codec or a non-finite update.
        """
        spec = parse_codec(task.codec)
        delta = {
            name: np.asarray(trained[name], dtype=np.float32) - weights[name] for name in weights
        }
        rng = config.rng(task.round_id, self._device_id, "codec")
        encoded = encode_update(delta, spec, rng=rng, residual=residual if spec.is_topk else None)
        return np.frombuffer(encoded.payload, dtype=np.uint8), encoded.residual

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
