"""Device-side local training: data sources, labelled feedback and numpy trainers.

What a train task does on a device (the agent wires these pieces together):

1. ``data = LocalData(data_dir / "training", feedback=buffer)`` describes where the
   local examples live: ``.npz`` and ``.csv`` files in a directory, plus labelled
   feedback collected from predictions (:mod:`edge_agent.training.feedback`).
2. ``config = TrainConfig.from_mapping(task.config)`` turns the coordinator's flat
   config dict into typed settings (epochs, batch size, optimizer, FedProx mu ...).
3. ``train, test = data.split(holdout_fraction=0.2, seed=config.seed)``.
4. ``trainer = trainer_for(task.family)`` picks the numpy trainer of a built-in
   family (or one registered with :func:`register_trainer`), and
   ``result = trainer.fit(global_weights, train, config, config.rng(task.round_id))``
   trains locally; ``result.weights`` minus the global weights is the update the
   agent encodes and reports, with ``result.num_examples`` and ``result.metrics``.
5. An evaluate task calls ``trainer.evaluate(global_weights, test)``.

Everything here is numpy only: no flwr, sklearn or deep-learning framework on the
device. Errors derive from :class:`~edge_agent.errors.TrainingError`.
"""

from __future__ import annotations

from edge_agent.training.data import LocalData
from edge_agent.training.feedback import FeedbackBuffer, FeedbackCollector, PredictionLog
from edge_agent.training.numpy_trainers import (
    DenseTrainer,
    MlpTrainer,
    SoftmaxTrainer,
    register_trainer,
    registered_families,
    trainer_for,
    unregister_trainer,
)
from edge_agent.training.trainer import Dataset, EvalResult, FitResult, TrainConfig, Trainer

__all__ = [
    "Dataset",
    "DenseTrainer",
    "EvalResult",
    "FeedbackBuffer",
    "FeedbackCollector",
    "FitResult",
    "LocalData",
    "MlpTrainer",
    "PredictionLog",
    "SoftmaxTrainer",
    "TrainConfig",
    "Trainer",
    "register_trainer",
    "registered_families",
    "trainer_for",
    "unregister_trainer",
]
