"""Participant (edge_agent.training.participant): a device's part in rounds, without a broker.

The link and the event sender are small in-memory twins: the link is a MemoryLink
(edge_agent.transport.memory), read for its (un)subscriptions; the sender encodes
every message as the agent would (so nothing invalid on the wire passes), records
what the coordinator would decode, and can play a disconnected link. Data,
residuals, trainers, codecs and the coordinator's update check are the real ones.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pytest

from compress.codecs import encode_update, kept_entries, layout_of, parse_codec
from compress.families import init_weights
from coordinator.federated.update_check import UpdateCheck, check_update
from edge_agent.protocol import (
    DEFAULT_LIMITS,
    ArrayEntry,
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
    decode,
    decode_arrays,
    encode,
    encode_arrays,
    sha256_hex,
)
from edge_agent.training.data import LocalData
from edge_agent.training.numpy_trainers import register_trainer, trainer_for, unregister_trainer
from edge_agent.training.participant import MAX_METRICS, MAX_STALLS, UPDATE_ARRAY, Participant
from edge_agent.training.residuals import ResidualStore
from edge_agent.training.trainer import FitResult, TrainConfig
from edge_agent.transport.memory import MemoryBroker, MemoryLink
from tests.clock_support import ManualClock
from tests.training_support import Gate

DEVICE = "dev-1"
FEATURES = 8
CLASSES = 3
EXAMPLES = 40
SEED = 3
HOLDOUT = 0.2  # Participant's default holdout_fraction
CHUNK = 100  # softmax [8, 3] weights are 364 bytes: 4 chunks
CONFIG: dict[str, int | float | str | bool] = {
    "epochs": 2,
    "batch_size": 8,
    "lr": 0.05,
    "seed": SEED,
    "server_round": 1,
}
TOL = 1e-6
WAIT_S = 60.0  # a generous bound on a tiny training (reached only when a test fails)

Weights = dict[str, npt.NDArray[np.float32]]
M = TypeVar("M", bound=Message)


# ----------------------------------------------------------------------- twins


def ignore(_topic: str, _payload: bytes, _retained: bool) -> None:
    """Chunks reach the participant from the test, not through the link."""


def memory_link() -> MemoryLink:
    """The agent's link, connected to an in-memory broker with nobody else on it."""
    link = MemoryLink(MemoryBroker(), client_id=DEVICE, subscriptions=[], on_message=ignore)
    link.start()
    return link


class Outbox:
    """The ``send`` callable: encodes like the agent, records what the peer decodes."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.online = True
        self.refuse: tuple[type[Message], ...] = ()

    def __call__(self, message: Message) -> bool:
        payload = encode(message, sender=DEVICE, sent_at=time.time(), limits=DEFAULT_LIMITS)
        self.sent.append(decode(payload, DEFAULT_LIMITS).message)
        return self.online and not isinstance(message, self.refuse)

    def of(self, kind: type[M]) -> list[M]:
        return [m for m in self.sent if isinstance(m, kind)]

    def types(self) -> list[type[Message]]:
        return [type(m) for m in self.sent]


@dataclass
class Rig:
    participant: Participant
    link: MemoryLink
    out: Outbox
    clock: ManualClock
    data_dir: Path
    residuals: ResidualStore

    @property
    def subscriptions(self) -> list[tuple[str, str]]:
        """The (un)subscriptions the participant made on its link, in order."""
        return self.link.subscription_changes


@dataclass(frozen=True)
class RoundWeights:
    """A round's global weights exactly as the coordinator ships them."""

    weights: Weights
    index: tuple[ArrayEntry, ...]
    body: bytes
    transfer_id: str

    @classmethod
    def of(cls, weights: Weights) -> RoundWeights:
        index, body = encode_arrays(weights)
        return cls(weights, index, body, sha256_hex(body))

    def task(
        self,
        clock: ManualClock,
        *,
        action: TaskAction = TaskAction.TRAIN,
        family: str = "softmax",
        codec: str = "fp32",
        round_id: str = "r1",
        chunk_size: int = CHUNK,
        deadline: float | None = None,
        config: Mapping[str, int | float | str | bool] | None = None,
        transfer_id: str | None = None,
        index: tuple[ArrayEntry, ...] | None = None,
        **fields: Any,
    ) -> TrainTask:
        """A task for these weights; ``fields`` are more TrainTask fields (model_spec ...)."""
        return TrainTask(
            round_id=round_id,
            task_id=uuid.uuid4().hex,
            action=action,
            model="m",
            family=family,
            weights_transfer_id=self.transfer_id if transfer_id is None else transfer_id,
            weights_size=len(self.body),
            weights_index=self.index if index is None else index,
            chunk_size=chunk_size,
            codec=codec,
            deadline=clock() + 60 if deadline is None else deadline,
            config=dict(CONFIG if config is None else config),
            **fields,
        )

    def chunks(self, chunk_size: int = CHUNK, transfer_id: str | None = None) -> list[Chunk]:
        tid = self.transfer_id if transfer_id is None else transfer_id
        count = -(-len(self.body) // chunk_size)
        return [
            Chunk.from_payload(self.body, i, chunk_size=chunk_size, transfer_id=tid)
            for i in range(count)
        ]


def weights_of(family: str = "softmax", hidden: Sequence[int] = (), seed: int = 1) -> Weights:
    return init_weights(family, [FEATURES, *hidden, CLASSES], np.random.default_rng(seed))


def stall_deadline(participant: Participant) -> float | None:
    """The property, read without mypy's narrowing from earlier asserts."""
    return participant.deadline


def settle(participant: Participant) -> None:
    """Play the agent's worker: wait for the training thread, send what it finished."""
    assert participant.wait_idle(WAIT_S)
    participant.poll()
    assert not participant.training


def take(participant: Participant, task: TrainTask) -> None:
    """Hand over a task, and let a training it starts (held weights) finish."""
    participant.on_task(task)
    settle(participant)


def deliver(participant: Participant, chunks: Iterable[Chunk]) -> list[bool]:
    """Hand over chunks, and let the training the last one starts finish."""
    consumed = [participant.on_chunk(chunk) for chunk in chunks]
    settle(participant)
    return consumed


def expected_fit(rig: Rig, task: TrainTask, weights: Weights) -> FitResult:
    """What the device's training must give: same data split, config and rng."""
    config = TrainConfig.from_mapping(task.config)
    train, _ = LocalData(rig.data_dir).split(HOLDOUT, seed=config.seed)
    rng = config.rng(task.round_id, DEVICE)
    return trainer_for(task.family).fit(weights, train, config, rng)


def decoded_update(report: UpdateReport, arrays: Mapping[str, Any], weights: Weights) -> Weights:
    return check_update(report, arrays, UpdateCheck(parse_codec(report.codec), layout_of(weights)))


def assert_close(actual: Mapping[str, Any], expected: Mapping[str, Any], atol: float = TOL) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=atol, err_msg=name)


def only_error(out: Outbox) -> ErrorReport:
    errors = out.of(ErrorReport)
    assert len(errors) == 1, out.sent
    assert errors[0].message
    return errors[0]


# -------------------------------------------------------------------- fixtures


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((EXAMPLES, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, EXAMPLES)
    np.savez(directory / "local.npz", x=x, y=y)
    return directory


@pytest.fixture
def make_rig(tmp_path: Path, data_dir: Path) -> Iterator[Callable[..., Rig]]:
    def make(*, with_data: bool = True, limits: Limits = DEFAULT_LIMITS, **kwargs: Any) -> Rig:
        link, out, clock = memory_link(), Outbox(), ManualClock(1_800_000_000.0)
        residuals = ResidualStore(tmp_path / "res")
        participant = Participant(
            device_id=DEVICE,
            data=LocalData(data_dir) if with_data else None,
            link=link,
            send=out,
            residuals=residuals,
            limits=limits,
            clock=clock,
            **kwargs,
        )
        made.append(participant)
        return Rig(participant, link, out, clock, data_dir, residuals)

    made: list[Participant] = []
    yield make
    for participant in made:
        assert participant.close(timeout=WAIT_S)


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


@pytest.fixture
def softmax() -> RoundWeights:
    return RoundWeights.of(weights_of())


def run_round(rig: Rig, weights: RoundWeights, task: TrainTask) -> UpdateReport:
    """Take a task, deliver all its chunks, and return the one update report."""
    take(rig.participant, task)
    deliver(rig.participant, weights.chunks(task.chunk_size))
    reports = rig.out.of(UpdateReport)
    assert reports, rig.out.sent
    assert reports[-1].task_id == task.task_id
    return reports[-1]


# ------------------------------------------------------------------ train task


@pytest.mark.parametrize(("family", "hidden"), [("softmax", ()), ("mlp", (16,))])
def test_train_task_downloads_trains_and_reports_the_encoded_update(
    rig: Rig, family: str, hidden: tuple[int, ...]
) -> None:
    weights = RoundWeights.of(weights_of(family, hidden))
    task = weights.task(rig.clock, family=family)
    p = rig.participant
    topic = broadcast_topic(weights.transfer_id)

    take(p, task)
    assert rig.out.sent == [TaskAck(round_id="r1", task_id=task.task_id, has_weights=False)]
    assert rig.subscriptions == [("subscribe", topic)]
    assert p.deadline is not None

    chunks = weights.chunks()
    assert len(chunks) >= 3
    order = [2, 0, 2, *range(3, len(chunks)), 1]  # out of order, with a duplicate
    for i in order[:-1]:
        assert p.on_chunk(chunks[i]) is True
    assert rig.out.types() == [TaskAck]  # nothing before the last chunk
    assert p.completed == 0
    assert p.on_chunk(chunks[order[-1]]) is True
    settle(p)

    assert rig.out.types() == [TaskAck, UpdateReport]
    report = rig.out.of(UpdateReport)[0]
    assert rig.subscriptions == [("subscribe", topic), ("unsubscribe", topic)]
    assert stall_deadline(p) is None
    assert p.completed == 1
    assert p.on_chunk(chunks[0]) is False  # a late duplicate: no download any more
    assert rig.out.types() == [TaskAck, UpdateReport]

    assert (report.round_id, report.task_id, report.codec) == ("r1", task.task_id, "fp32")
    assert report.upload_transfer_id is None
    assert report.arrays is not None
    assert list(report.arrays) == [UPDATE_ARRAY]
    assert report.arrays[UPDATE_ARRAY].dtype == np.uint8
    assert report.arrays[UPDATE_ARRAY].ndim == 1

    fitted = expected_fit(rig, task, weights.weights)
    assert report.num_examples == fitted.num_examples == EXAMPLES - round(EXAMPLES * HOLDOUT)
    assert {"train_loss", "train_accuracy"} <= set(report.metrics)
    assert report.metrics["train_loss"] == pytest.approx(fitted.metrics["train_loss"])
    assert report.metrics["train_accuracy"] == pytest.approx(fitted.metrics["train_accuracy"])

    delta = decoded_update(report, report.arrays, weights.weights)
    trained = {name: weights.weights[name] + delta[name] for name in weights.weights}
    assert_close(trained, fitted.weights)
    assert any(np.abs(d).max() > 1e-4 for d in delta.values())  # it did train


@pytest.mark.parametrize(
    ("codec", "atol"),
    [
        ("fp16", 1e-3),
        ("int8", None),
        ("topk:0.25", None),
        ("topk:0.25+int8", None),
        ("topk:0.25+fp16", None),
    ],
)
def test_every_codec_gives_a_report_the_coordinator_accepts(
    rig: Rig, softmax: RoundWeights, codec: str, atol: float | None
) -> None:
    task = softmax.task(rig.clock, codec=codec)
    report = run_round(rig, softmax, task)
    assert report.codec == codec
    assert report.arrays is not None
    delta = decoded_update(report, report.arrays, softmax.weights)
    fitted = expected_fit(rig, task, softmax.weights)
    exact = {name: fitted.weights[name] - w for name, w in softmax.weights.items()}
    if atol is not None:
        assert_close(delta, exact, atol=atol)
    spec = parse_codec(codec)
    if spec.is_topk:
        kept = sum(int(np.count_nonzero(d)) for d in delta.values())
        assert kept <= kept_entries(spec, layout_of(softmax.weights))
    assert rig.participant.completed == 1


def test_a_second_task_on_held_weights_reports_at_once(rig: Rig, softmax: RoundWeights) -> None:
    run_round(rig, softmax, softmax.task(rig.clock))
    calls = list(rig.subscriptions)
    sent = len(rig.out.sent)

    task = softmax.task(rig.clock, round_id="r2")
    take(rig.participant, task)

    assert rig.subscriptions == calls  # no subscription, no download
    new = rig.out.sent[sent:]
    assert new[0] == TaskAck(round_id="r2", task_id=task.task_id, has_weights=True)
    assert [type(m) for m in new] == [TaskAck, UpdateReport]
    report = cast(UpdateReport, new[1])
    assert report.task_id == task.task_id
    assert report.arrays is not None
    delta = decoded_update(report, report.arrays, softmax.weights)
    fitted = expected_fit(rig, task, softmax.weights)
    assert_close({n: w + delta[n] for n, w in softmax.weights.items()}, fitted.weights)
    assert rig.participant.deadline is None
    assert rig.participant.completed == 2


# ---------------------------------------------------------------- evaluate task


def test_evaluate_task_reports_loss_and_accuracy_on_the_held_out_split(
    rig: Rig, softmax: RoundWeights
) -> None:
    task = softmax.task(rig.clock, action=TaskAction.EVALUATE)
    take(rig.participant, task)
    deliver(rig.participant, softmax.chunks())

    assert rig.out.types() == [TaskAck, EvalReport]
    report = rig.out.of(EvalReport)[0]
    assert (report.round_id, report.task_id) == ("r1", task.task_id)
    _, held_out = LocalData(rig.data_dir).split(HOLDOUT, seed=SEED)
    assert len(held_out) == round(EXAMPLES * HOLDOUT)
    assert report.num_examples == len(held_out)
    expected = trainer_for("softmax").evaluate(softmax.weights, held_out)
    assert set(report.metrics) >= {"loss", "accuracy"}
    assert report.metrics["loss"] == pytest.approx(expected.loss)
    assert report.metrics["accuracy"] == pytest.approx(expected.accuracy)
    assert rig.participant.completed == 1
    assert rig.subscriptions[-1] == ("unsubscribe", broadcast_topic(softmax.transfer_id))


def test_evaluate_without_a_held_out_split_uses_the_training_examples(
    make_rig: Callable[..., Rig], softmax: RoundWeights
) -> None:
    rig = make_rig(holdout_fraction=0.0)
    take(rig.participant, softmax.task(rig.clock, action=TaskAction.EVALUATE))
    deliver(rig.participant, softmax.chunks())
    assert [r.num_examples for r in rig.out.of(EvalReport)] == [EXAMPLES]


def test_a_train_task_after_evaluating_the_same_weights_needs_no_download(
    rig: Rig, softmax: RoundWeights
) -> None:
    take(rig.participant, softmax.task(rig.clock, action=TaskAction.EVALUATE))
    deliver(rig.participant, softmax.chunks())
    calls = list(rig.subscriptions)

    task = softmax.task(rig.clock)
    take(rig.participant, task)
    assert rig.subscriptions == calls
    assert rig.out.types() == [TaskAck, EvalReport, TaskAck, UpdateReport]
    assert rig.out.of(TaskAck)[1].has_weights is True
    assert rig.participant.completed == 2


# -------------------------------------------------------------------- refusals


def assert_refused(rig: Rig, task: TrainTask, code: str) -> None:
    take(rig.participant, task)
    assert rig.out.types() == [ErrorReport]
    error = only_error(rig.out)
    assert (error.code, error.ref) == (code, task.task_id)
    assert rig.subscriptions == []
    assert rig.participant.deadline is None
    assert rig.participant.completed == 0
    assert not rig.participant.wants_broadcast(task.weights_transfer_id)


def test_no_data_is_refused(make_rig: Callable[..., Rig], softmax: RoundWeights) -> None:
    rig = make_rig(with_data=False)
    assert_refused(rig, softmax.task(rig.clock), "no_data")


def test_an_unknown_family_is_refused(rig: Rig, softmax: RoundWeights) -> None:
    assert_refused(rig, softmax.task(rig.clock, family="resnet"), "training_error")


@pytest.mark.parametrize("codec", ["topk:7", "topk:0", "fp8", "topk:0.1+fp32"])
def test_a_bad_codec_is_refused(rig: Rig, softmax: RoundWeights, codec: str) -> None:
    assert_refused(rig, softmax.task(rig.clock, codec=codec), "bad_update")


def test_weights_over_the_size_bound_are_refused(
    make_rig: Callable[..., Rig], softmax: RoundWeights
) -> None:
    rig = make_rig(max_weights_bytes=len(softmax.body) - 1)
    assert_refused(rig, softmax.task(rig.clock), "too_large")


def test_weights_at_the_size_bound_are_accepted(
    make_rig: Callable[..., Rig], softmax: RoundWeights
) -> None:
    rig = make_rig(max_weights_bytes=len(softmax.body))
    run_round(rig, softmax, softmax.task(rig.clock))
    assert rig.participant.completed == 1


@pytest.mark.parametrize("late", [0.0, 1.0])
def test_a_task_past_its_deadline_gets_no_answer(
    rig: Rig, softmax: RoundWeights, late: float
) -> None:
    task = softmax.task(rig.clock, deadline=rig.clock.now - late)
    take(rig.participant, task)
    assert rig.out.sent == []
    assert rig.subscriptions == []
    assert rig.participant.deadline is None
    assert rig.participant.on_chunk(softmax.chunks()[0]) is False


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ({"lr": -1.0}, "bad_train_config"),
        ({"optimizer": "rmsprop"}, "bad_train_config"),
        ({"epochs": 0}, "bad_train_config"),
    ],
)
def test_a_training_failure_after_the_download_is_reported(
    rig: Rig, softmax: RoundWeights, config: dict[str, Any], code: str
) -> None:
    task = softmax.task(rig.clock, config={**CONFIG, **config})
    take(rig.participant, task)
    deliver(rig.participant, softmax.chunks())
    assert rig.out.types() == [TaskAck, ErrorReport]
    error = only_error(rig.out)
    assert (error.code, error.ref) == (code, task.task_id)
    assert rig.participant.completed == 0
    assert rig.subscriptions[-1] == ("unsubscribe", broadcast_topic(softmax.transfer_id))


def test_weights_that_do_not_fit_the_data_are_reported(rig: Rig) -> None:
    weights = RoundWeights.of(
        init_weights("softmax", [FEATURES + 1, CLASSES], np.random.default_rng(1))
    )
    task = weights.task(rig.clock)
    take(rig.participant, task)
    deliver(rig.participant, weights.chunks())
    error = only_error(rig.out)
    assert (error.code, error.ref) == ("bad_data", task.task_id)
    assert rig.out.of(UpdateReport) == []


# --------------------------------------------------------------- bad weights


def test_weights_that_do_not_match_their_transfer_id_are_refused(
    rig: Rig, softmax: RoundWeights
) -> None:
    other = RoundWeights.of(weights_of(seed=2))
    assert len(other.body) == len(softmax.body)
    claimed = other.transfer_id  # the task names the sha256 of other bytes
    task = softmax.task(rig.clock, transfer_id=claimed)
    take(rig.participant, task)
    assert all(deliver(rig.participant, softmax.chunks(transfer_id=claimed)))

    assert rig.out.types() == [TaskAck, ErrorReport]
    error = only_error(rig.out)
    assert (error.code, error.ref) == ("payload_hash", task.task_id)
    assert rig.subscriptions == [
        ("subscribe", broadcast_topic(claimed)),
        ("unsubscribe", broadcast_topic(claimed)),
    ]
    assert rig.participant.completed == 0
    assert rig.participant.deadline is None

    # The bad bytes were not kept as the weights of that transfer id.
    retry = softmax.task(rig.clock, transfer_id=claimed)
    take(rig.participant, retry)
    assert rig.out.of(TaskAck)[-1] == TaskAck(
        round_id="r1", task_id=retry.task_id, has_weights=False
    )
    assert rig.out.of(UpdateReport) == []


def test_weights_that_do_not_split_along_their_index_are_refused(
    rig: Rig, softmax: RoundWeights
) -> None:
    merged = (ArrayEntry("W0", len(softmax.body)),)  # one entry over two .npy blobs
    task = softmax.task(rig.clock, index=merged)
    take(rig.participant, task)
    deliver(rig.participant, softmax.chunks())
    error = only_error(rig.out)
    assert (error.code, error.ref) == ("malformed", task.task_id)
    assert rig.out.of(UpdateReport) == []
    assert rig.participant.completed == 0


# ---------------------------------------------------------------------- stalls


def test_a_stall_requests_exactly_the_missing_chunks_then_gives_up(
    make_rig: Callable[..., Rig], softmax: RoundWeights
) -> None:
    rig = make_rig(stall_timeout_s=0.05)
    p = rig.participant
    topic = broadcast_topic(softmax.transfer_id)
    before = time.monotonic()
    take(p, softmax.task(rig.clock))
    first = p.deadline
    assert first is not None
    assert before + 0.05 <= first <= time.monotonic() + 0.05

    chunks = softmax.chunks()
    assert len(chunks) == 4
    deliver(p, [chunks[1], chunks[3]])
    assert p.deadline is not None
    assert p.deadline >= first
    missing = ChunkRequest(transfer_id=softmax.transfer_id, indices=(0, 2))

    for stall in range(1, MAX_STALLS + 1):
        before = time.monotonic()
        p.on_deadline()
        assert rig.out.sent[-1] == missing
        assert len(rig.out.of(ChunkRequest)) == stall
        assert p.deadline is not None
        assert p.deadline >= before + 0.05
    assert rig.subscriptions == [("subscribe", topic)]

    sent = len(rig.out.sent)
    p.on_deadline()  # MAX_STALLS fruitless requests: dropped
    assert len(rig.out.sent) == sent
    assert stall_deadline(p) is None
    assert rig.subscriptions == [("subscribe", topic), ("unsubscribe", topic)]
    assert not p.wants_broadcast(softmax.transfer_id)
    assert p.on_chunk(chunks[0]) is False
    p.on_deadline()
    p.on_connected()
    assert len(rig.out.sent) == sent
    assert p.completed == 0
    assert rig.out.types() == [TaskAck] + [ChunkRequest] * MAX_STALLS


def test_progress_resets_the_stall_count(
    make_rig: Callable[..., Rig], softmax: RoundWeights
) -> None:
    rig = make_rig(stall_timeout_s=0.05)
    p = rig.participant
    take(p, softmax.task(rig.clock))
    chunks = softmax.chunks()
    for _ in range(MAX_STALLS):
        p.on_deadline()
    assert p.on_chunk(chunks[2]) is True
    for _ in range(MAX_STALLS):
        p.on_deadline()
    assert p.deadline is not None  # still downloading
    assert rig.out.sent[-1] == ChunkRequest(transfer_id=softmax.transfer_id, indices=(0, 1, 3))
    deliver(p, [chunks[0], chunks[1], chunks[3]])
    assert rig.out.types()[-1] is UpdateReport
    assert p.completed == 1


def test_a_duplicate_chunk_is_not_progress(
    make_rig: Callable[..., Rig], softmax: RoundWeights
) -> None:
    rig = make_rig(stall_timeout_s=0.05)
    p = rig.participant
    take(p, softmax.task(rig.clock))
    chunk = softmax.chunks()[1]
    assert p.on_chunk(chunk) is True
    for _ in range(MAX_STALLS):
        p.on_deadline()
    assert p.on_chunk(chunk) is True  # the same chunk again
    p.on_deadline()
    assert stall_deadline(p) is None
    assert rig.out.types() == [TaskAck] + [ChunkRequest] * MAX_STALLS


def test_a_download_past_the_task_deadline_is_dropped_silently(
    rig: Rig, softmax: RoundWeights
) -> None:
    task = softmax.task(rig.clock)
    take(rig.participant, task)
    rig.clock.now = task.deadline
    rig.participant.on_deadline()
    assert rig.out.types() == [TaskAck]
    assert rig.participant.deadline is None
    assert rig.subscriptions[-1] == ("unsubscribe", broadcast_topic(softmax.transfer_id))


def test_reconnecting_during_a_download_rerequests_the_missing_chunks(
    make_rig: Callable[..., Rig], softmax: RoundWeights
) -> None:
    rig = make_rig(stall_timeout_s=0.05)
    p = rig.participant
    p.on_connected()  # nothing to ask for
    assert rig.out.sent == []

    take(p, softmax.task(rig.clock))
    p.on_connected()
    assert rig.out.sent[-1] == ChunkRequest(transfer_id=softmax.transfer_id, indices=(0, 1, 2, 3))
    chunks = softmax.chunks()
    deliver(p, [chunks[0], chunks[3]])
    before = time.monotonic()
    p.on_connected()
    assert rig.out.sent[-1] == ChunkRequest(transfer_id=softmax.transfer_id, indices=(1, 2))
    assert p.deadline is not None
    assert p.deadline >= before + 0.05
    # Reconnecting is not a stall: MAX_STALLS more stalls are still requests.
    for _ in range(MAX_STALLS):
        p.on_deadline()
    assert p.deadline is not None
    assert rig.out.types() == [TaskAck] + [ChunkRequest] * (2 + MAX_STALLS)


def test_a_chunk_request_lists_at_most_max_list_items(
    make_rig: Callable[..., Rig], softmax: RoundWeights
) -> None:
    rig = make_rig(limits=Limits(max_list_items=2))
    take(rig.participant, softmax.task(rig.clock))
    rig.participant.on_deadline()
    assert rig.out.sent[-1] == ChunkRequest(transfer_id=softmax.transfer_id, indices=(0, 1))


# ---------------------------------------------------- replacement and routing


def test_a_new_task_replaces_an_unfinished_download(rig: Rig, softmax: RoundWeights) -> None:
    p = rig.participant
    old_task = softmax.task(rig.clock)
    take(p, old_task)
    old_chunks = softmax.chunks()
    deliver(p, old_chunks[:2])

    fresh = RoundWeights.of(weights_of(seed=5))
    new_task = fresh.task(rig.clock, round_id="r2")
    take(p, new_task)
    old_topic = broadcast_topic(softmax.transfer_id)
    new_topic = broadcast_topic(fresh.transfer_id)
    assert rig.subscriptions == [
        ("subscribe", old_topic),
        ("unsubscribe", old_topic),
        ("subscribe", new_topic),
    ]
    assert not p.wants_broadcast(softmax.transfer_id)
    assert p.wants_broadcast(fresh.transfer_id)
    assert deliver(p, old_chunks) == [False] * len(old_chunks)

    p.on_deadline()
    assert rig.out.sent[-1] == ChunkRequest(transfer_id=fresh.transfer_id, indices=(0, 1, 2, 3))
    deliver(p, fresh.chunks())
    assert rig.out.types() == [TaskAck, TaskAck, ChunkRequest, UpdateReport]
    assert all(
        getattr(m, "task_id", new_task.task_id) != old_task.task_id for m in rig.out.sent[1:]
    )
    report = rig.out.of(UpdateReport)[0]
    assert report.task_id == new_task.task_id
    assert report.arrays is not None
    delta = decoded_update(report, report.arrays, fresh.weights)
    fitted = expected_fit(rig, new_task, fresh.weights)
    assert_close({n: w + delta[n] for n, w in fresh.weights.items()}, fitted.weights)
    assert p.completed == 1


def test_a_refused_task_also_ends_an_unfinished_download(rig: Rig, softmax: RoundWeights) -> None:
    take(rig.participant, softmax.task(rig.clock))
    take(rig.participant, softmax.task(rig.clock, codec="topk:7"))
    topic = broadcast_topic(softmax.transfer_id)
    assert rig.subscriptions == [("subscribe", topic), ("unsubscribe", topic)]
    assert rig.participant.deadline is None
    assert rig.out.types() == [TaskAck, ErrorReport]


def test_chunks_of_other_transfers_are_not_consumed(rig: Rig, softmax: RoundWeights) -> None:
    p = rig.participant
    other = RoundWeights.of(weights_of(seed=9))
    assert not p.wants_broadcast(softmax.transfer_id)
    assert p.on_chunk(softmax.chunks()[0]) is False  # no download at all

    take(p, softmax.task(rig.clock))
    assert p.wants_broadcast(softmax.transfer_id)
    assert not p.wants_broadcast(other.transfer_id)
    assert not p.wants_broadcast("coordinator")
    assert deliver(p, other.chunks()) == [False] * 4
    assert rig.out.types() == [TaskAck]
    p.on_deadline()
    assert rig.out.sent[-1] == ChunkRequest(transfer_id=softmax.transfer_id, indices=(0, 1, 2, 3))

    deliver(p, softmax.chunks())
    assert not p.wants_broadcast(softmax.transfer_id)
    assert p.completed == 1


def test_a_chunk_cut_differently_is_consumed_but_not_kept(rig: Rig, softmax: RoundWeights) -> None:
    p = rig.participant
    take(p, softmax.task(rig.clock))
    assert all(deliver(p, softmax.chunks(chunk_size=CHUNK // 2)))  # same transfer id
    assert rig.out.types() == [TaskAck]
    p.on_deadline()
    assert rig.out.sent[-1] == ChunkRequest(transfer_id=softmax.transfer_id, indices=(0, 1, 2, 3))


# ----------------------------------------------------------------------- top-k


def test_top_k_keeps_its_residual_and_feeds_it_into_the_next_round(
    rig: Rig, softmax: RoundWeights
) -> None:
    codec = "topk:0.2"
    spec = parse_codec(codec)
    layout = layout_of(softmax.weights)
    k = kept_entries(spec, layout)
    assert rig.residuals.load("m", layout) is None

    task1 = softmax.task(rig.clock, codec=codec)
    report1 = run_round(rig, softmax, task1)
    assert report1.arrays is not None
    sent1 = decoded_update(report1, report1.arrays, softmax.weights)
    assert sum(int(np.count_nonzero(v)) for v in sent1.values()) == k
    residual1 = rig.residuals.load("m", layout)
    assert residual1 is not None
    fit1 = expected_fit(rig, task1, softmax.weights)
    delta1 = {n: fit1.weights[n] - w for n, w in softmax.weights.items()}
    assert_close({n: sent1[n] + residual1[n] for n in delta1}, delta1)  # acc = sent + residual
    assert any(np.abs(r).max() > 0 for r in residual1.values())

    task2 = softmax.task(rig.clock, codec=codec, round_id="r2")
    take(rig.participant, task2)
    report2 = rig.out.of(UpdateReport)[-1]
    assert report2.task_id == task2.task_id
    assert report2.arrays is not None
    sent2 = decoded_update(report2, report2.arrays, softmax.weights)
    residual2 = rig.residuals.load("m", layout)
    assert residual2 is not None
    fit2 = expected_fit(rig, task2, softmax.weights)
    delta2 = {n: fit2.weights[n] - w for n, w in softmax.weights.items()}
    acc2 = {n: delta2[n] + residual1[n] for n in delta2}
    assert_close({n: sent2[n] + residual2[n] for n in acc2}, acc2)

    without = encode_update(delta2, spec, rng=np.random.default_rng(0), residual=None)
    assert report2.arrays[UPDATE_ARRAY].tobytes() != without.payload
    assert rig.participant.completed == 2


# ------------------------------------------------------------------- upload


def reassemble(chunks: Sequence[Chunk], transfer_id: str) -> bytes:
    assert chunks
    assert {c.transfer_id for c in chunks} == {transfer_id}
    assert [c.index for c in chunks] == list(range(chunks[0].count))
    assert all(c.count == len(chunks) for c in chunks)
    assert all(len(c.data) <= DEFAULT_LIMITS.default_chunk_bytes for c in chunks)
    payload = b"".join(c.data for c in chunks)
    assert all(c.total_size == len(payload) for c in chunks)
    assert sha256_hex(payload) == transfer_id
    return payload


@pytest.mark.parametrize(
    ("hidden", "inline"),
    [
        (9000, False),  # ~0.4 MB of fp32 update
        (5375, True),  # the largest fp32 mlp update that still goes inline
        (5376, False),
    ],
)
def test_an_update_too_big_for_one_message_is_uploaded_in_chunks(
    rig: Rig, hidden: int, inline: bool
) -> None:
    weights = RoundWeights.of(weights_of("mlp", (hidden,)))
    chunk_size = DEFAULT_LIMITS.default_chunk_bytes
    task = weights.task(rig.clock, family="mlp", chunk_size=chunk_size)
    report = run_round(rig, weights, task)
    after_ack = rig.out.sent[1:]
    assert rig.out.types()[0] is TaskAck
    assert after_ack[-1] is report
    assert rig.participant.completed == 1

    if inline:
        assert len(after_ack) == 1
        assert report.upload_transfer_id is None
        assert report.arrays is not None
        arrays: Mapping[str, Any] = report.arrays
    else:
        chunks = cast(list[Chunk], after_ack[:-1])
        assert all(isinstance(c, Chunk) for c in chunks)
        assert len(chunks) >= 2
        assert report.arrays is None
        assert report.upload_transfer_id is not None
        assert report.upload_index
        payload = reassemble(chunks, report.upload_transfer_id)
        arrays = decode_arrays(report.upload_index, payload)
        assert list(arrays) == [UPDATE_ARRAY]
        assert arrays[UPDATE_ARRAY].dtype == np.uint8
        assert arrays[UPDATE_ARRAY].nbytes + 4096 > DEFAULT_LIMITS.max_message_bytes

    assert report.codec == "fp32"
    assert report.num_examples == EXAMPLES - round(EXAMPLES * HOLDOUT)
    delta = decoded_update(report, arrays, weights.weights)
    fitted = expected_fit(rig, task, weights.weights)
    assert_close({n: w + delta[n] for n, w in weights.weights.items()}, fitted.weights)


# -------------------------------------------------------------- disconnected


def test_a_disconnected_link_neither_crashes_nor_counts_a_report(
    rig: Rig, softmax: RoundWeights
) -> None:
    rig.out.online = False
    task = softmax.task(rig.clock)
    take(rig.participant, task)  # the ack does not go out; the download still starts
    assert rig.subscriptions == [("subscribe", broadcast_topic(softmax.transfer_id))]
    deliver(rig.participant, softmax.chunks())
    assert rig.out.types() == [TaskAck, UpdateReport]  # attempted
    assert rig.participant.completed == 0

    take(rig.participant, softmax.task(rig.clock, action=TaskAction.EVALUATE))
    assert rig.out.types()[-1] is EvalReport
    take(rig.participant, softmax.task(rig.clock, family="resnet"))
    assert rig.out.types()[-1] is ErrorReport
    assert rig.participant.completed == 0

    rig.out.online = True
    take(rig.participant, softmax.task(rig.clock))
    assert rig.participant.completed == 1


def test_an_interrupted_upload_sends_no_report(rig: Rig) -> None:
    weights = RoundWeights.of(weights_of("mlp", (9000,)))
    rig.out.refuse = (Chunk,)
    task = weights.task(rig.clock, family="mlp", chunk_size=DEFAULT_LIMITS.default_chunk_bytes)
    take(rig.participant, task)
    deliver(rig.participant, weights.chunks(DEFAULT_LIMITS.default_chunk_bytes))
    assert rig.out.types() == [TaskAck, Chunk]  # stopped at the first refused chunk
    assert rig.participant.completed == 0


# -------------------------------------------------------------------- status


def test_train_examples_counts_the_local_examples(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    assert make_rig().participant.train_examples() == EXAMPLES
    assert make_rig(with_data=False).participant.train_examples() == 0
    missing = Participant(
        device_id=DEVICE,
        data=LocalData(tmp_path / "missing"),
        link=memory_link(),
        send=Outbox(),
        residuals=ResidualStore(tmp_path / "res"),
        limits=DEFAULT_LIMITS,
    )
    assert missing.train_examples() == 0


def test_train_examples_follows_the_data_directory(rig: Rig) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, FEATURES)).astype(np.float32)
    np.savez(rig.data_dir / "more.npz", x=x, y=rng.integers(0, CLASSES, 7))
    assert rig.participant.train_examples() == EXAMPLES + 7


def test_a_top_k_update_that_does_not_go_out_leaves_the_residual_as_it_was(
    rig: Rig, softmax: RoundWeights
) -> None:
    codec = "topk:0.2"
    layout = layout_of(softmax.weights)
    run_round(rig, softmax, softmax.task(rig.clock, codec=codec))
    before = rig.residuals.load("m", layout)
    assert before is not None
    rig.out.online = False
    take(rig.participant, softmax.task(rig.clock, codec=codec, round_id="r2"))
    assert rig.out.types()[-1] is UpdateReport  # attempted, not delivered
    after = rig.residuals.load("m", layout)
    assert after is not None
    assert_close(after, before, atol=0.0)  # what the lost update carried is not forgotten
    rig.out.online = True
    take(rig.participant, softmax.task(rig.clock, codec=codec, round_id="r3"))
    changed = rig.residuals.load("m", layout)
    assert changed is not None
    assert any(not np.array_equal(changed[n], before[n]) for n in before)


class ChattyTrainer:
    """A plugged-in trainer that reports far more metrics than a report carries."""

    def __init__(self) -> None:
        self.inner = trainer_for("softmax")

    def fit(self, weights: Any, data: Any, config: Any, rng: Any) -> FitResult:
        fitted = self.inner.fit(weights, data, config, rng)
        metrics = {f"metric_with_a_long_name_{i:03d}": float(i) for i in range(200)}
        return FitResult(fitted.weights, fitted.num_examples, metrics)

    def evaluate(self, weights: Any, data: Any) -> Any:
        return self.inner.evaluate(weights, data)


def test_a_trainer_with_many_metrics_still_reports_inline(rig: Rig, softmax: RoundWeights) -> None:
    register_trainer("chatty", ChattyTrainer)
    try:
        report = run_round(rig, softmax, softmax.task(rig.clock, family="chatty"))
    finally:
        unregister_trainer("chatty")
    assert report.arrays is not None
    assert len(report.metrics) == MAX_METRICS
    assert rig.participant.completed == 1


# ----------------------------------------------------------- training thread


def start_held(rig: Rig, weights: RoundWeights, gate: Gate) -> TrainTask:
    """A gated train task whose weights arrived: its training waits at the gate."""
    task = weights.task(rig.clock, family="gated")
    rig.participant.on_task(task)
    for chunk in weights.chunks():
        assert rig.participant.on_chunk(chunk)
    assert gate.started.wait(WAIT_S)
    return task


def test_training_runs_on_the_training_thread_and_reports_when_polled(
    make_rig: Callable[..., Rig], softmax: RoundWeights, gate: Gate
) -> None:
    woken = threading.Event()
    rig = make_rig(wake=woken.set)
    p = rig.participant
    task = start_held(rig, softmax, gate)
    assert p.training
    assert gate.threads == [f"train-{DEVICE}"]  # not this (the worker's) thread
    p.poll()  # nothing finished yet
    assert rig.out.types() == [TaskAck]
    assert not woken.is_set()

    gate.release.set()
    assert woken.wait(WAIT_S)  # the training thread wakes the worker
    assert p.wait_idle(WAIT_S)
    assert rig.out.types() == [TaskAck]  # nothing is sent from the training thread
    p.poll()
    assert rig.out.types() == [TaskAck, UpdateReport]
    assert rig.out.of(UpdateReport)[0].task_id == task.task_id
    assert not rig.participant.training  # (p.training was narrowed to True above)
    assert p.completed == 1


def test_a_new_task_drops_the_result_of_a_training_still_running(
    rig: Rig, softmax: RoundWeights, gate: Gate
) -> None:
    p = rig.participant
    old = start_held(rig, softmax, gate)
    new = softmax.task(rig.clock, round_id="r2")  # same weights: held, runs at once
    p.on_task(new)
    gate.release.set()
    settle(p)

    assert rig.out.types() == [TaskAck, TaskAck, UpdateReport]
    assert [r.task_id for r in rig.out.of(UpdateReport)] == [new.task_id]
    assert all(getattr(m, "task_id", None) != old.task_id for m in rig.out.sent[1:])
    assert p.completed == 1


def test_the_same_task_sent_again_during_its_training_goes_on_training(
    rig: Rig, softmax: RoundWeights, gate: Gate
) -> None:
    task = start_held(rig, softmax, gate)
    rig.participant.on_task(task)  # the coordinator's resend to a device that reconnected
    assert rig.out.types() == [TaskAck, TaskAck]
    assert rig.out.of(TaskAck)[1].has_weights is True
    gate.release.set()
    settle(rig.participant)
    assert gate.threads == [f"train-{DEVICE}"]  # trained once
    assert rig.out.types() == [TaskAck, TaskAck, UpdateReport]
    assert rig.out.of(UpdateReport)[0].task_id == task.task_id


def test_a_refused_task_also_drops_a_running_training(
    rig: Rig, softmax: RoundWeights, gate: Gate
) -> None:
    start_held(rig, softmax, gate)
    rig.participant.on_task(softmax.task(rig.clock, codec="topk:7"))
    gate.release.set()
    settle(rig.participant)
    assert rig.out.types() == [TaskAck, ErrorReport]
    assert rig.participant.completed == 0


def test_close_abandons_a_training_that_does_not_end(
    rig: Rig, softmax: RoundWeights, gate: Gate
) -> None:
    p = rig.participant
    start_held(rig, softmax, gate)
    started = time.monotonic()
    assert p.close(timeout=0.05) is False  # still held at the gate: abandoned
    assert time.monotonic() - started < WAIT_S / 2
    assert not p.training
    gate.release.set()
    assert p.wait_idle(WAIT_S)
    p.poll()
    assert rig.out.types() == [TaskAck]  # an abandoned training reports nothing
    assert p.close(WAIT_S) is True  # idempotent; the thread has ended


class BrokenTrainer:
    """A plugged-in trainer with a bug: ``fit`` raises something that is no AgentError."""

    def fit(self, weights: Any, data: Any, config: Any, rng: Any) -> FitResult:
        raise RuntimeError("boom")

    def evaluate(self, weights: Any, data: Any) -> Any:
        raise RuntimeError("boom")


def test_a_trainer_that_crashes_is_reported_and_the_next_task_trains(
    rig: Rig, softmax: RoundWeights
) -> None:
    register_trainer("broken", BrokenTrainer)
    try:
        task = softmax.task(rig.clock, family="broken")
        take(rig.participant, task)
        deliver(rig.participant, softmax.chunks())
    finally:
        unregister_trainer("broken")
    error = only_error(rig.out)
    assert (error.code, error.ref) == ("training_error", task.task_id)
    assert "boom" in error.message
    report = run_round(rig, softmax, softmax.task(rig.clock, round_id="r2"))
    assert report.num_examples > 0
