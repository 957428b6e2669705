"""Flower's ``Grid`` over fedge's MQTT protocol: any Flower strategy, unchanged.

Flower's Message-API strategies talk to clients through a
:class:`flwr.serverapp.grid.Grid`: ``configure_train`` builds one ``Message`` per
sampled node, ``send_and_receive`` delivers them and returns the replies, and
``aggregate_train`` averages (or medians, or krums) the replies' arrays. fedge's
devices do not run Flower; :class:`MqttGrid` translates:

* **down**: the Flower messages of one call share one weights ``ArrayRecord``; it
  becomes one chunked payload (concatenated ``.npy`` blobs) served by the
  :class:`~coordinator.link.port.Hub`. Each device gets a small
  :class:`~edge_agent.protocol.TrainTask` (round, task id, action, weights id and
  index, codec, deadline, the ConfigRecord's scalar entries). Devices answer
  ``task_ack`` (after subscribing to the payload's broadcast topic); when every
  device that lacks the weights has answered (or ``gather_s`` passed), the payload
  is published ONCE on its broadcast topic. Whatever a device misses it pulls with
  ``chunk_request``.
* **up**: an ``update_report`` is checked (:mod:`coordinator.federated.update_check`: the
  task it answers was sent to that device, codec, size, shapes, finite values,
  norm) and decoded; its example count is bounded by what the device announced
  when it was sampled and by the run's cap. Once every train task of the phase has
  an outcome (or at the deadline) the phase's updates are screened together
  (:mod:`coordinator.federated.round_screen`: norm outliers rejected; in robust
  mode, norms and weights clipped to the medians); each update left is added to
  the global weights and becomes the Flower reply (``arrays`` = the device's new
  weights, ``metrics`` with the bounded ``num-examples``), so strategies see
  exactly what a Flower client would have sent. An ``eval_report`` becomes a
  reply with ``metrics`` only (its count bounded the same way). Large updates
  arrive as chunked uploads (``chunk`` messages on the device's ``events`` topic)
  first, held in bounded memory by :mod:`coordinator.federated.uploads`.

A *phase* is one ``send_and_receive`` call (the train or the evaluate half of a
round). It ends when every task has an outcome (replied, failed, rejected, device
gone offline) or at the phase deadline. Replies to tasks of an earlier phase are
late: counted and dropped. A device that comes back online while its task is
still open gets the task again. :attr:`MqttGrid.stats` counts, per phase, every
MQTT payload byte up and down (tasks, chunks, acks, reports, uploads), the
outcomes and the rejections by reason.

Messages arrive on paho's thread and are only queued there; all the work
(decoding updates, building replies) happens on the thread that called
``send_and_receive``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from compress.codecs import layout_of, max_payload_bytes
from coordinator.errors import RunError, UpdateRejectedError, UploadRefusedError
from coordinator.federated.round_screen import bounded_examples, screen_updates
from coordinator.federated.tasks import (
    TRAIN_METRICS,
    GridSettings,
    PhaseStats,
    Task,
    TaskState,
    metric_record,
    node_id_of,
    scalar_config,
)
from coordinator.federated.update_check import UpdateCheck, checked_update
from coordinator.federated.uploads import UploadReceiver
from coordinator.link.port import Hub
from edge_agent.errors import ProtocolError
from edge_agent.protocol import (
    ArrayEntry,
    Chunk,
    ChunkRequest,
    Envelope,
    ErrorReport,
    EvalReport,
    Status,
    TaskAck,
    TaskAction,
    TrainTask,
    UpdateReport,
    decode_arrays,
    encode_arrays,
)
from edge_agent.protocol.arrays import MAX_NPY_HEADER_BYTES

__all__ = ["MqttGrid"]

logger = logging.getLogger(__name__)

FLOWER_NODE_ID = 1
"""Flower's id for the server side (``SUPERLINK_NODE_ID``)."""
MAX_QUEUED = 100_000
"""Device messages held between two waits (beyond: the oldest are dropped)."""


class MqttGrid(Grid):
    """A Flower ``Grid`` whose nodes are fedge devices (see the module docstring)."""

    def __init__(
        self,
        hub: Hub,
        settings: GridSettings,
        *,
        run_id: int = 1,
        clock: Callable[[], float] = time.time,
        cancel: threading.Event | None = None,
    ) -> None:
        """Attach to a started hub (its listener is added here).

        Call :meth:`close` when done. Once ``cancel`` is set, :meth:`send_and_receive`
        stops waiting (within a quarter of a second) and returns what it has.
        """
        self._hub = hub
        self._cancel = cancel or threading.Event()
        self.settings = settings
        self._clock = clock
        self._run = Run.create_empty(run_id)
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = FLOWER_NODE_ID
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, Envelope, int]] = deque(maxlen=MAX_QUEUED)
        self._devices: dict[int, str] = {}
        self._nodes: list[int] = []
        self._tasks: dict[str, Task] = {}
        self._old_tasks: set[str] = set()
        self.uploads = UploadReceiver(settings.upload_budget_bytes, settings.upload_dir)
        """The devices' chunked uploads (:mod:`coordinator.federated.uploads`)."""
        self._served: dict[str, int] = {}  # transfer id -> bytes sent before this phase
        self._announced: dict[str, int] = {}
        self._round = 0
        self._deadline = 0.0
        self.stats = PhaseStats()
        self.on_progress: Callable[[int, int], None] | None = None
        """Called with (tasks with an outcome, tasks) while waiting for replies."""
        hub.add_listener(self._on_message)

    def close(self) -> None:
        """Detach from the hub, stop serving this grid's weights, remove the upload spool."""
        self._hub.remove_listener(self._on_message)
        with self._cond:
            self.uploads.close()
        for transfer_id in self._served:
            self._hub.withdraw_payload(transfer_id)
        self._served.clear()

    # ---------------------------------------------------------------- phases

    def begin_phase(
        self,
        round_no: int,
        device_ids: Iterable[str],
        deadline: float,
        announced: Mapping[str, int] | None = None,
    ) -> None:
        """Open a phase: the nodes offered to the strategy, and its deadline.

        Args:
            round_no: The round (names it on the wire).
            device_ids: The devices the strategy may use this phase.
            deadline: Unix time by which replies must be in.
            announced: Each device's announced ``train_examples`` when it was
                sampled: a report's example count is bounded by it (a device
                missing here is bounded by the cap alone).
        """
        with self._cond:
            self._announced = dict(announced or {})
            self._old_tasks.update(self._tasks)
            self._tasks = {}
            self.uploads.clear()
            self._round = round_no
            self._deadline = deadline
            self._nodes = []
            for device_id in device_ids:
                node = node_id_of(device_id)
                self._devices[node] = device_id
                self._nodes.append(node)
            for transfer_id in list(self._served):
                self._served[transfer_id] = self._hub.bytes_sent(transfer_id)
            self.stats = PhaseStats()

    def end_phase(self) -> PhaseStats:
        """Close the phase: open tasks time out; the phase's figures.

        Returns:
            The phase's statistics.
        """
        with self._cond:
            self._drain()
            for task in self._tasks.values():
                if task.state is TaskState.SENT:
                    task.state = TaskState.TIMED_OUT
                self.stats.outcomes[task.state] += 1
            for transfer_id, before in self._served.items():
                self.stats.downlink_bytes += self._hub.bytes_sent(transfer_id) - before
                self._served[transfer_id] = self._hub.bytes_sent(transfer_id)
            return self.stats

    def retire_weights(self, keep: str | None = None) -> None:
        """Stop serving the weights of earlier phases (except ``keep``)."""
        with self._cond:
            for transfer_id in [t for t in self._served if t != keep]:
                self._hub.withdraw_payload(transfer_id)
                del self._served[transfer_id]

    def device_of(self, message: Message) -> str | None:
        """The device a reply came from (or an instruction goes to)."""
        meta = message.metadata
        node = meta.src_node_id if meta.reply_to_message_id else meta.dst_node_id
        return self._devices.get(node)

    # -------------------------------------------------------------- Grid API

    def set_run(self, run: Run) -> None:
        """Set the Flower run this grid works in."""
        self._run = run

    @property
    def run(self) -> Run:
        """The Flower run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message to one node (Flower's deprecated helper, kept for strategies)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The nodes of the current phase.

        Raises:
            RunError: called after the phase deadline: a strategy that waits
                for more nodes than the phase offers (Flower's ``sample_nodes``
                polls this forever) fails the phase instead of hanging.
        """
        with self._cond:
            if self._clock() > self._deadline:
                raise RunError(
                    f"the strategy was still waiting for more nodes at the deadline "
                    f"(this round offers {len(self._nodes)})"
                )
            return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Send each message's task to its device; the weights go out once.

        Returns:
            The ids of the messages sent (a message to an unknown node, or of an
            unknown type, is logged and skipped).
        """
        payloads: dict[int, tuple[str, tuple[ArrayEntry, ...], dict[str, Any]]] = {}
        sent: list[Task] = []
        for message in messages:
            task = self._prepare(message, payloads)
            if task is None:
                continue
            with self._cond:
                self._tasks[task.task_id] = task
                self.stats.tasks += 1
            size = self._hub.send(task.device_id, task.command)
            with self._cond:
                self.stats.downlink_bytes += size
                if size == 0:
                    task.state = TaskState.FAILED
                    self.stats.failures["unreachable"] += 1
                else:
                    sent.append(task)
        self._push_weights(sent)
        return [task.task_id for task in sent]

    def _prepare(
        self,
        message: Message,
        payloads: dict[int, tuple[str, tuple[ArrayEntry, ...], dict[str, Any]]],
    ) -> Task | None:
        meta = message.metadata
        device_id = self._devices.get(meta.dst_node_id)
        if device_id is None or meta.dst_node_id not in self._nodes:
            logger.warning("message for node %d, which is not in this phase", meta.dst_node_id)
            return None
        if meta.message_type == MessageType.TRAIN:
            action = TaskAction.TRAIN
        elif meta.message_type == MessageType.EVALUATE:
            action = TaskAction.EVALUATE
        else:
            logger.warning("message type %r is not supported by fedge devices", meta.message_type)
            return None
        content = message.content
        if len(content.array_records) != 1:
            logger.warning("a %s message must carry exactly one ArrayRecord", action)
            return None
        record = next(iter(content.array_records.values()))
        key = id(record)
        if key not in payloads:
            weights = {
                name: np.ascontiguousarray(array.numpy(), dtype=np.float32)
                for name, array in record.items()
            }
            index, body = encode_arrays(weights, limits=self._hub.limits)
            transfer_id = self._hub.serve_payload(body)
            with self._cond:
                self._served.setdefault(transfer_id, self._hub.bytes_sent(transfer_id))
            payloads[key] = (transfer_id, index, weights)
        transfer_id, index, weights = payloads[key]
        config: dict[str, int | float | str | bool] = {}
        for config_record in content.config_records.values():
            config.update(scalar_config(config_record))
        task_id = uuid.uuid4().hex
        meta.__dict__["_message_id"] = task_id
        command = TrainTask(
            round_id=f"r{self._round}",
            task_id=task_id,
            action=action,
            model=self.settings.model,
            family=self.settings.family,
            weights_transfer_id=transfer_id,
            weights_size=sum(entry.length for entry in index),
            weights_index=index,
            chunk_size=self._hub.chunk_size,
            codec=str(self.settings.codec),
            deadline=self._deadline,
            config=config,
            model_spec=self.settings.model_spec,
            task=self.settings.task,
            model_args=dict(self.settings.model_args),
        )
        check = UpdateCheck(self.settings.codec, layout_of(weights), self.settings.max_update_norm)
        task = Task(task_id, device_id, message, command, weights, check)
        task.announced = self._announced.get(device_id)
        return task

    def _push_weights(self, tasks: list[Task]) -> None:
        """Once the devices that need the weights acknowledged: publish them once."""
        gather_end = time.monotonic() + self.settings.gather_s
        with self._cond:
            while True:
                self._drain()
                waiting = [t for t in tasks if t.state is TaskState.SENT and not t.acked]
                left = gather_end - time.monotonic()
                if not waiting or left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            needed: dict[str, list[str]] = {}
            for task in tasks:
                if task.state is TaskState.SENT and not task.has_weights:
                    needed.setdefault(task.command.weights_transfer_id, []).append(task.device_id)
        for transfer_id, device_ids in needed.items():
            if not self._hub.push_payload(transfer_id, sorted(device_ids)):
                logger.warning("disconnected while pushing weights; devices will ask again")

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies received so far for these message ids (each returned once)."""
        with self._cond:
            self._drain()
            return self._take_replies(set(message_ids))

    def _take_replies(self, ids: set[str], *, final: bool = False) -> list[Message]:
        self._release(final=final)
        replies = []
        for task_id in ids:
            task = self._tasks.get(task_id)
            if task is not None and task.reply is not None:
                replies.append(task.reply)
                task.reply = None
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push the messages, then wait for every task's outcome, the phase deadline
        or ``timeout``, whichever comes first.

        Returns:
            The replies (accepted updates and evaluations only).
        """
        ids = set(self.push_messages(messages))
        end = self._deadline if timeout is None else min(self._deadline, self._clock() + timeout)
        replies: list[Message] = []
        shown = -1
        with self._cond:
            while True:
                self._drain()
                replies.extend(self._take_replies(ids))
                open_tasks = [
                    t for t in ids if (task := self._tasks.get(t)) and task.state is TaskState.SENT
                ]
                settled = len(ids) - len(open_tasks)
                if self.on_progress is not None and settled != shown:
                    shown = settled
                    self.on_progress(settled, len(ids))
                left = end - self._clock()
                if not open_tasks or left <= 0 or self._cancel.is_set():
                    break
                self._cond.wait(min(left, 0.25))
            replies.extend(self._take_replies(ids, final=True))
        # Arrival order is chance; aggregation order should not be (float sums).
        return sorted(replies, key=lambda reply: reply.metadata.src_node_id)

    # ------------------------------------------------------- incoming messages

    def _on_message(self, device_id: str, envelope: Envelope, size: int) -> None:
        """Coordinator listener (paho's thread): queue, never work here."""
        if isinstance(
            envelope.message,
            Status | TaskAck | UpdateReport | EvalReport | Chunk | ErrorReport | ChunkRequest,
        ):
            with self._cond:
                self._inbox.append((device_id, envelope, size))
                self._cond.notify_all()

    def _drain(self) -> None:
        """Handle queued messages (caller holds the lock)."""
        while self._inbox:
            device_id, envelope, size = self._inbox.popleft()
            try:
                self._handle(device_id, envelope.message, size)
            except Exception:
                logger.exception("round: a message from %s could not be handled", device_id)

    def _task_of(self, device_id: str, task_id: str | None, size: int) -> Task | None:
        task = self._tasks.get(task_id) if task_id else None
        if task is None or task.device_id != device_id:
            if task_id in self._old_tasks:
                self.stats.late += 1
                logger.info("late reply from %s to task %s (dropped)", device_id, task_id)
            else:
                logger.warning("%s answered a task it was not given (dropped)", device_id)
            return None
        self.stats.uplink_bytes += size
        return task

    def _handle(self, device_id: str, message: Any, size: int) -> None:
        if isinstance(message, Status):
            self._on_status(device_id, message)
        elif isinstance(message, ChunkRequest):
            if message.transfer_id in self._served and any(
                t.device_id == device_id for t in self._tasks.values()
            ):
                self.stats.uplink_bytes += size
        elif isinstance(message, Chunk):
            self._on_upload_chunk(device_id, message, size)
        elif isinstance(message, TaskAck):
            task = self._task_of(device_id, message.task_id, size)
            if task is not None:
                task.acked = True
                task.has_weights = message.has_weights
        elif isinstance(message, ErrorReport):
            task = self._task_of(device_id, message.ref, size)
            if task is not None and task.state is TaskState.SENT:
                task.state = TaskState.FAILED
                self.stats.failures[message.code] += 1
                logger.info("%s could not do task %s: %s: %s", device_id, message.ref,
                            message.code, message.message)  # fmt: skip
        elif isinstance(message, UpdateReport | EvalReport):
            task = self._task_of(device_id, message.task_id, size)
            if task is not None and task.state is TaskState.SENT:
                self._on_report(task, message)

    def _on_status(self, device_id: str, status: Status) -> None:
        for task in self._tasks.values():
            if task.device_id != device_id:
                continue
            if not status.online and task.state is TaskState.SENT:
                task.state = TaskState.OFFLINE
                logger.info("%s went offline during its task", device_id)
            elif (
                status.online and task.state is TaskState.OFFLINE and self._clock() < self._deadline
            ):
                logger.info("%s is back: sending its task again", device_id)
                task.state = TaskState.SENT
                task.acked = False
                self.stats.downlink_bytes += self._hub.send(device_id, task.command)

    def _on_upload_chunk(self, device_id: str, chunk: Chunk, size: int) -> None:
        task = next(
            (t for t in self._tasks.values()
             if t.device_id == device_id and t.state is TaskState.SENT),
            None,
        )  # fmt: skip
        if task is None or task.command.action is not TaskAction.TRAIN:
            logger.info("upload chunk from %s without an open train task (dropped)", device_id)
            return
        self.stats.uplink_bytes += size
        # The .npy blob of the largest payload the codec can produce for this model.
        limit = max_payload_bytes(task.check.codec, task.check.layout) + MAX_NPY_HEADER_BYTES
        # A refusal is logged and counted there; the report naming it is rejected.
        with contextlib.suppress(UploadRefusedError):
            self.uploads.receive(device_id, chunk, limit=limit)

    def _report_arrays(self, task: Task, report: UpdateReport) -> Mapping[str, npt.NDArray[Any]]:
        if report.arrays is not None:
            return report.arrays
        assert report.upload_transfer_id is not None
        payload = self.uploads.take(task.device_id, report.upload_transfer_id)
        try:
            return decode_arrays(report.upload_index, payload, limits=self._hub.limits)
        except ProtocolError as exc:
            raise UpdateRejectedError("malformed", str(exc)) from exc

    def _on_report(self, task: Task, report: UpdateReport | EvalReport) -> None:
        action = task.command.action
        if isinstance(report, EvalReport) != (action is TaskAction.EVALUATE):
            self._reject(task, "malformed", f"a {report.TYPE} does not answer a {action} task")
            return
        if isinstance(report, EvalReport):
            if report.num_examples < 1:
                self._reject(task, "bad_examples", "evaluated no examples")
                return
            examples = self._bounded(task, report.num_examples)
            metrics = metric_record(report.metrics, self.settings.eval_metrics, examples)
            task.reply = Message(RecordDict({"metrics": metrics}), reply_to=task.instruction)
        else:
            try:
                checked = checked_update(report, self._report_arrays(task, report), task.check)
            except UpdateRejectedError as exc:
                self._reject(task, exc.reason, str(exc))
                return
            task.delta, task.norm = checked.delta, checked.norm
            task.examples = self._bounded(task, report.num_examples)
            task.metrics = dict(report.metrics)
        task.state = TaskState.DONE

    def _bounded(self, task: Task, reported: int) -> int:
        """A report's example count, bounded by the announcement and the cap (counted)."""
        cap = self.settings.max_examples_per_update
        examples = bounded_examples(reported, task.announced, cap)
        if examples < reported:
            self.stats.clipped_examples += 1
            logger.warning("%s reported %d examples, announced %s (cap %d): weighted as %d",
                           task.device_id, reported, task.announced, cap, examples)  # fmt: skip
        return examples

    def _release(self, *, final: bool) -> None:
        """Screen the phase's checked updates together and make them replies.

        Waits (unless ``final``, the deadline passed or the run was cancelled)
        until no task of the phase is still open. Updates already released count
        in the medians but are not screened again.
        """
        tasks = [t for t in self._tasks.values() if t.norm is not None]
        if not any(t.delta is not None for t in tasks):
            return
        settled = not any(t.state is TaskState.SENT for t in self._tasks.values())
        if not (final or settled or self._clock() > self._deadline or self._cancel.is_set()):
            return
        norms = [t.norm or 0.0 for t in tasks]
        admissions = screen_updates(norms, [t.examples for t in tasks],
                                    multiple=self.settings.norm_multiple,
                                    robust=self.settings.robust)  # fmt: skip
        multiple = self.settings.norm_multiple
        for task, admission in zip(tasks, admissions, strict=True):
            delta, task.delta = task.delta, None
            if delta is None:
                continue
            if admission.outlier:
                detail = f"update norm {task.norm:.3g} is over {multiple:g}x the round's median"
                error = UpdateRejectedError("norm_outlier", detail)
                self._reject(task, error.reason, str(error))
                task.norm = None  # not part of later medians
                continue
            if admission.scale < 1.0:
                logger.info("robust: the update of %s clipped to the median norm (x%.3g)",
                            task.device_id, admission.scale)  # fmt: skip
            scale = np.float32(admission.scale)
            arrays = {name: Array(w + delta[name] * scale) for name, w in task.weights.items()}
            metrics = metric_record(task.metrics, TRAIN_METRICS, admission.weight)
            content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics})
            task.reply = Message(content, reply_to=task.instruction)

    def _reject(self, task: Task, reason: str, detail: str) -> None:
        task.state = TaskState.REJECTED
        self.stats.rejected[reason] += 1
        logger.warning("rejected the update of %s: %s", task.device_id, detail)
