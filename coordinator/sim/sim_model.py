"""What a simulation trains: the model, its starting weights, the baseline, the artifact.

``fedge simulate --model`` takes a built-in family (``mlp``, ``softmax``) or a PyTorch
model factory (``module:function``, ``zoo:small_cnn``). :class:`SimModel` turns that and
the fleet's data into a :class:`~coordinator.federated.models.ModelDef` (example shape,
outputs, task) and does the three things a simulation needs of it besides the rounds:

1. :meth:`SimModel.initial_weights`: the seeded starting global weights;
2. :meth:`SimModel.centralized`: the centralized baseline, the same model trained on the
   union of the agents' shards in one place with the same epoch budget (rounds x local
   epochs), evaluated like the federated one (:func:`evaluate_model`);
3. :meth:`SimModel.package`: the final weights as a signed int8 artifact: built-in
   families through :func:`~coordinator.delivery.packaging.package_weights`, torch
   models exported with ``torch.onnx``, quantized with a calibration sample of the
   training data and gated against fp32 on the test set
   (:func:`~coordinator.delivery.torch_packaging.package_torch`).

A built-in family is a dense network on rows: given images or windows, it trains on
the flattened examples (:meth:`SimModel.rows`), which is how the built-in MLP is
compared with a CNN on the same split. torch is imported only for torch models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.keys import SigningKey
from compress.lineage import Lineage
from coordinator.delivery.packaging import LabelledData, PackageResult, package_weights
from coordinator.errors import RunError
from coordinator.federated.models import (
    ModelDef,
    evaluate_model,
    implied_outputs,
    initial_weights,
    model_def_for,
    torch_module,
)
from coordinator.sim.fleet_data import FleetData
from edge_agent.training.model_spec import ModelTask, check_task
from edge_agent.training.numpy_trainers import trainer_for
from edge_agent.training.torch_models import factory_task
from edge_agent.training.trainer import Dataset, TrainConfig, Trainer

__all__ = ["BUILTIN_FAMILIES", "CALIBRATION_ROWS", "SimModel"]

Weights = dict[str, npt.NDArray[np.float32]]

BUILTIN_FAMILIES = ("mlp", "softmax")
CALIBRATION_ROWS = 256
"""Training examples (a seeded sample) that calibrate int8 quantization of a torch model."""


def _outputs(task: ModelTask, y: npt.NDArray[Any] | None, test: LabelledData) -> int:
    """Classes (classification), target width (regression) or 0 (reconstruction)."""
    if y is None and task != "reconstruction":
        what = "labels" if task == "classification" else "targets"
        raise RunError(f"{task} needs {what} (y) in the dataset")
    return implied_outputs(task, *(() if y is None else (y, test.y)))


@dataclass(frozen=True)
class SimModel:
    """The model of one simulation and the data it trains on."""

    model: ModelDef
    data: FleetData
    hidden: int

    @classmethod
    def choose(cls, model: str, task: str | None, data: FleetData, *, hidden: int) -> SimModel:
        """The model ``--model`` names, fitted to the fleet's data.

        Raises:
            RunError: a built-in family with a task other than classification, or a
                task (``--task`` or the factory's own) the data cannot serve.
            UnknownModelError: a malformed spec or a factory that cannot be imported.
            TorchUnavailableError: a PyTorch model without PyTorch installed.
        """
        wanted = check_task(task) if task is not None else None
        data_task = check_task(data.task)
        if model in BUILTIN_FAMILIES:
            if (wanted or data_task) != "classification":
                raise RunError(
                    f"the built-in {model} classifies; for {wanted or data_task} use a PyTorch "
                    "model (--model zoo:mlp_regressor, zoo:dense_autoencoder or module:function)"
                )
            rows = (int(np.prod(data.x.shape[1:])),)
            outputs = _outputs("classification", data.y, data.test)
            return cls(model_def_for(model, "classification", rows, outputs), data, hidden)
        if wanted is not None and wanted != data_task:
            raise RunError(f"--task {wanted} does not fit the dataset, which is for {data_task}")
        declared = factory_task(model)  # imports the factory's module: unknown ones fail here
        if declared is not None and declared != data_task:
            raise RunError(f"{model} is a {declared} model; the dataset is for {data_task}")
        shape = tuple(int(d) for d in data.x.shape[1:])
        outputs = _outputs(data_task, data.y, data.test)
        chosen = model_def_for(model, data_task, shape, outputs)
        return cls(chosen, data, hidden)

    # ---------------------------------------------------------------- data

    def rows(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``x`` as the model takes it: flattened for a built-in family."""
        if self.model.is_torch:
            return x
        return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)

    @property
    def test(self) -> LabelledData:
        """The coordinator's test set, shaped for the model."""
        test = self.data.test
        return LabelledData(self.rows(test.x), test.y, test.task)

    def train_set(self) -> Dataset:
        """The union of the agents' shards (what the centralized baseline trains on)."""
        return Dataset.from_arrays(self.rows(self.data.x), self.data.y, self.model.task)

    # ------------------------------------------------------------- weights

    def initial_weights(self, seed: int) -> Weights:
        """Seeded starting weights."""
        return initial_weights(self.model, seed, hidden=self.hidden)

    def trainer(self) -> Trainer:
        """A trainer of this model (torch or numpy), as an agent would build it."""
        if not self.model.is_torch:
            return trainer_for(self.model.family)
        from edge_agent.training.torch_trainer import TorchTrainer  # noqa: PLC0415 - torch is optional

        # One thread, as each simulated agent trains: torch's thread count is
        # process-wide, and a fixed count keeps the baseline the same from run to run.
        return TorchTrainer(
            self.model.spec,
            task=self.model.task,
            input_shape=self.model.input_shape,
            num_outputs=self.model.num_outputs,
            num_threads=1,
        )

    def evaluate(self, weights: Mapping[str, npt.NDArray[np.float32]]) -> dict[str, float]:
        """The task's metrics of ``weights`` on the test set."""
        return evaluate_model(self.model, weights, self.test)

    def centralized(self, weights: Weights, train: TrainConfig) -> dict[str, float]:
        """The same model from ``weights`` trained on all the training data in one place.

        Args:
            weights: The run's initial weights.
            train: The local training settings with ``epochs`` = the run's epoch budget.
        """
        fitted = self.trainer().fit(weights, self.train_set(), train, train.rng("centralized"))
        return self.evaluate(fitted.weights)

    # ----------------------------------------------------------- packaging

    def calibration(self, seed: int) -> npt.NDArray[np.float32]:
        """A seeded sample of training examples for int8 calibration."""
        x = self.rows(self.data.x)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.permutation(len(x))[:CALIBRATION_ROWS])
        return np.ascontiguousarray(x[pick], dtype=np.float32)

    def package(
        self,
        weights: Weights,
        *,
        name: str,
        version: int,
        keys: Sequence[SigningKey],
        out: Path,
        now: datetime,
        seed: int,
        metadata: Mapping[str, str],
        lineage: Lineage | None = None,
    ) -> PackageResult:
        """The final weights as a signed int8 artifact at ``out`` (see the module docstring);
        its manifest carries ``lineage`` when given.

        Raises:
            AccuracyDropError: int8 loses more than the task's gate allows.
            PackagingError, CompressError: the model cannot be exported or packaged.
        """
        if not self.model.is_torch:
            return package_weights(
                self.model.family, weights, name=name, version=version, keys=keys, out=out,
                evaluation=self.test, now=now, metadata=dict(metadata), lineage=lineage,
            )  # fmt: skip
        from coordinator.delivery.torch_packaging import package_torch  # noqa: PLC0415

        return package_torch(
            torch_module(self.model, weights), task=self.model.task,
            sample_shape=self.model.input_shape, name=name,
            version=version, keys=keys, out=out, calibration=self.calibration(seed),
            evaluation=self.test, now=now, metadata=dict(metadata), lineage=lineage,
        )  # fmt: skip
