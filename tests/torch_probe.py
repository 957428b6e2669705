"""Test-only probe: when does a device import PyTorch? Run in a fresh interpreter.

    python -m tests.torch_probe DIR PORT [WEIGHTS.npz]

Imports only edge_agent, compress and numpy (nothing that could load torch itself),
then, recording ``"torch" in sys.modules`` after each step:

1. ``after_start``: an :class:`~edge_agent.agent.Agent` whose ``[training] models``
   allows a user model is built and started (its broker at 127.0.0.1:PORT need not
   run) and stopped; ``train_models`` is what its status lists;
2. ``after_refusal``: a participant refuses a torch task for a model it does not
   allow (``refusal`` is the error code);
3. ``after_numpy_round``: it trains a built-in numpy (softmax) round (``numpy`` is
   the report type);
4. with ``WEIGHTS.npz`` (initial weights of ``zoo:dense_autoencoder`` for rows of
   :data:`FEATURES`, made by the caller): ``after_torch_task``: it evaluates that
   zoo model (``torch`` is the report type, ``torch_metrics`` its metric names).

Prints one JSON object. tests/test_import_boundaries.py runs it.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from compress.families import init_weights
from compress.keys import generate_signing_key, save_keypair
from edge_agent.agent import Agent
from edge_agent.config.agent import AgentConfig, BrokerConfig, TrainingConfig, TrustConfig
from edge_agent.protocol import (
    DEFAULT_LIMITS,
    Chunk,
    Message,
    TaskAction,
    TrainTask,
    encode_arrays,
    sha256_hex,
)
from edge_agent.training.data import LocalData
from edge_agent.training.participant import Participant
from edge_agent.training.residuals import ResidualStore
from edge_agent.transport.memory import MemoryBroker, MemoryLink

FEATURES = 6
CLASSES = 3
OWN_SPEC = "owner_models.nets:tiny_net"
WAIT_S = 60.0


def _ignore(_topic: str, _payload: bytes, _retained: bool) -> None:
    return None


def _task(family: str, weights: dict[str, Any], **fields: Any) -> tuple[TrainTask, list[Chunk]]:
    index, body = encode_arrays(weights)
    transfer_id = sha256_hex(body)
    size = DEFAULT_LIMITS.default_chunk_bytes
    chunks = [
        Chunk.from_payload(body, i, chunk_size=size, transfer_id=transfer_id)
        for i in range(-(-len(body) // size))
    ]
    task = TrainTask(
        round_id="r1",
        task_id=uuid.uuid4().hex,
        action=fields.pop("action", TaskAction.TRAIN),
        model="m",
        family=family,
        weights_transfer_id=transfer_id,
        weights_size=len(body),
        weights_index=index,
        chunk_size=size,
        codec="fp32",
        deadline=time.time() + 600,
        config={"epochs": 1, "batch_size": 8, "seed": 1},
        **fields,
    )
    return task, chunks


def _run(
    participant: Participant, sent: list[Message], task: TrainTask, chunks: list[Chunk]
) -> str:
    participant.on_task(task)
    for chunk in chunks:
        participant.on_chunk(chunk)
    assert participant.wait_idle(WAIT_S)
    participant.poll()
    return sent[-1].TYPE


def main(root: Path, port: int, weights_file: Path | None) -> dict[str, Any]:
    _, public = save_keypair(generate_signing_key(), root / "keys")
    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, FEATURES)).astype(np.float32)
    np.savez(data / "local.npz", x=x, y=rng.integers(0, CLASSES, 20))
    seen: dict[str, Any] = {}

    config = AgentConfig(
        device_id="pi-probe",
        broker=BrokerConfig(host="127.0.0.1", port=port, tls=False),
        data_dir=root / "state",
        trust=TrustConfig(keys=(public,)),
        training=TrainingConfig(data=data, models=(OWN_SPEC,)),
    )
    agent = Agent(config)
    agent.start()
    seen["train_models"] = list(agent.rounds.train_models)
    agent.stop()
    seen["after_start"] = "torch" in sys.modules

    sent: list[Message] = []
    link = MemoryLink(MemoryBroker(), client_id="pi-probe", subscriptions=[], on_message=_ignore)
    link.start()
    participant = Participant(
        device_id="pi-probe",
        data=LocalData(data),
        link=link,
        send=lambda message: sent.append(message) is None,
        residuals=ResidualStore(root / "residuals"),
        limits=DEFAULT_LIMITS,
    )
    flat = init_weights("softmax", [FEATURES, CLASSES], np.random.default_rng(1))
    unknown, _ = _task("torch", flat, model_spec="evil.payload:build")
    participant.on_task(unknown)
    seen["refusal"] = getattr(sent[-1], "code", None)
    seen["after_refusal"] = "torch" in sys.modules

    seen["numpy"] = _run(participant, sent, *_task("softmax", flat))
    seen["after_numpy_round"] = "torch" in sys.modules

    if weights_file is not None:
        with np.load(weights_file) as arrays:
            autoencoder = {name: arrays[name] for name in arrays.files}
        task, chunks = _task(
            "torch",
            autoencoder,
            action=TaskAction.EVALUATE,
            model_spec="zoo:dense_autoencoder",
            task="reconstruction",
            model_args={"input_shape": str(FEATURES), "num_outputs": 0},
        )
        seen["torch"] = _run(participant, sent, task, chunks)
        seen["torch_metrics"] = sorted(getattr(sent[-1], "metrics", {}))
        seen["after_torch_task"] = "torch" in sys.modules
    assert participant.close(WAIT_S)
    return seen


if __name__ == "__main__":
    weights = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), weights)))
