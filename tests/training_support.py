"""A trainer that holds its ``fit`` at a gate, for tests of training off the worker.

:class:`Gate` is registered as the trainer family ``gated`` by the ``gate``
fixture of tests/conftest.py (unregistered and released after the test). Its
trainer is the built-in softmax trainer whose ``fit`` notes the thread it runs
on, sets :attr:`Gate.started` and waits until the test sets :attr:`Gate.release`.
"""

from __future__ import annotations

import threading
from typing import Any

from edge_agent.training.numpy_trainers import trainer_for
from edge_agent.training.trainer import FitResult

GATED_FAMILY = "gated"
"""The trainer family the ``gate`` fixture registers."""

HOLD_S = 60.0
"""Longest a gated ``fit`` waits (reached only when a test fails to release it)."""


class Gate:
    """Holds a plugged-in trainer's ``fit`` until the test releases it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def trainer(self) -> GatedTrainer:
        return GatedTrainer(self)


class GatedTrainer:
    """The softmax trainer, whose ``fit`` waits at the gate (and notes its thread)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.inner = trainer_for("softmax")

    def fit(self, weights: Any, data: Any, config: Any, rng: Any) -> FitResult:
        self.gate.threads.append(threading.current_thread().name)
        self.gate.started.set()
        assert self.gate.release.wait(HOLD_S), "the gate was never released"
        return self.inner.fit(weights, data, config, rng)

    def evaluate(self, weights: Any, data: Any) -> Any:
        return self.inner.evaluate(weights, data)
