"""Codecs, update checks and every built-in strategy work unchanged on N-D tensors.

A PyTorch model's weights are named arrays of any rank (conv kernels are 4-D, a
BatchNorm's running statistics 1-D): the same paths that carry the built-in MLP's
matrices carry them, as flat vectors with a layout of names and shapes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from compress.codecs import decode_update, encode_update, layout_of, parse_codec
from coordinator.federated.strategies import BUILTIN_STRATEGIES, build_strategy
from coordinator.federated.tasks import node_id_of
from coordinator.federated.update_check import UpdateCheck, check_update
from edge_agent.protocol import UpdateReport
from edge_agent.training.participant import UPDATE_ARRAY

Weights = dict[str, npt.NDArray[np.float32]]


def cnn_like(seed: int, scale: float = 1.0) -> Weights:
    """The layout of a small CNN's state_dict: 4-D kernels, BN buffers, a dense head."""
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1.weight": (8, 1, 3, 3),
        "conv1.bias": (8,),
        "bn1.running_mean": (8,),
        "bn1.running_var": (8,),
        "conv2.weight": (16, 8, 3, 3),
        "fc.weight": (10, 64),
        "fc.bias": (10,),
    }
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "topk:0.2", "topk:0.2+int8"])
def test_every_codec_round_trips_n_d_tensors(codec: str) -> None:
    delta = cnn_like(0, scale=0.01)
    spec = parse_codec(codec)
    encoded = encode_update(delta, spec, rng=np.random.default_rng(1))
    decoded = decode_update(encoded.payload, spec, layout_of(delta))
    assert list(decoded) == list(delta)
    for name, value in delta.items():
        assert decoded[name].shape == value.shape
    if codec == "fp32":
        for name, value in delta.items():
            np.testing.assert_array_equal(decoded[name], value)
    if encoded.residual is not None:  # top-k: what was not sent is carried, shape for shape
        for name, value in delta.items():
            np.testing.assert_allclose(decoded[name] + encoded.residual[name], value, atol=1e-6)


def test_the_update_check_decodes_and_bounds_n_d_updates() -> None:
    delta = cnn_like(0, scale=0.01)
    spec = parse_codec("int8")
    payload = encode_update(delta, spec, rng=np.random.default_rng(1)).payload
    blob = np.frombuffer(payload, dtype=np.uint8)
    report = UpdateReport(
        round_id="r1", task_id="0" * 32, num_examples=10, codec="int8",
        arrays={UPDATE_ARRAY: blob},
    )  # fmt: skip
    accepted = check_update(report, {UPDATE_ARRAY: blob}, UpdateCheck(spec, layout_of(delta)))
    assert accepted["conv2.weight"].shape == (16, 8, 3, 3)
    tight = UpdateCheck(spec, layout_of(delta), max_norm=1e-6)
    with pytest.raises(Exception, match="norm"):
        check_update(report, {UPDATE_ARRAY: blob}, tight)


def _reply(index: int, weights: Weights, examples: int) -> Message:
    instruction = Message(RecordDict({}), node_id_of(f"dev{index}"), MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = f"m{index}"
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )
    return Message(content, reply_to=instruction)


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process-global task identity Flower 1.41 wants (the grid sets it in a run)."""
    for field in ("_task_id", "_run_id", "_node_id"):  # restored after the test
        monkeypatch.setattr(TaskIdentity, field, 1)


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("name", sorted(BUILTIN_STRATEGIES))
def test_every_built_in_strategy_aggregates_n_d_tensors(name: str) -> None:
    clients = [cnn_like(seed) for seed in range(7)]
    replies = [_reply(i, w, 10 + i) for i, w in enumerate(clients)]
    strategy = build_strategy(name, {}, federated_eval=False)
    adaptive = hasattr(strategy, "current_arrays")  # FedAdam, FedYogi: a server optimizer
    if adaptive:  # configure_train would set the round's global arrays
        global_arrays = cnn_like(99)
        strategy.current_arrays = {k: v.copy() for k, v in global_arrays.items()}  # type: ignore[attr-defined]
    aggregated, _metrics = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    for key, value in clients[0].items():
        out = aggregated[key].numpy()
        assert out.shape == value.shape
        assert np.isfinite(out).all()
        if adaptive:
            assert not np.array_equal(out, global_arrays[key])  # the server step moved it
            continue
        low = np.min([c[key] for c in clients], axis=0)
        high = np.max([c[key] for c in clients], axis=0)
        assert (out >= low - 1e-5).all()  # within the clients' values
        assert (out <= high + 1e-5).all()
