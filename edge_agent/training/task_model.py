"""What a train task trains on this device: checked before any download, built when it runs.

A train task names its model by ``family``: a built-in numpy family (``softmax``,
``mlp``, or one registered with
:func:`~edge_agent.training.numpy_trainers.register_trainer`), or ``"torch"``, whose
``model_spec`` is a PyTorch factory ``module.path:function`` with ``task`` and
``model_args`` (``input_shape`` as text ``"1,28,28"``, ``num_outputs``).

:class:`DeviceModels` holds what this device allows and can do, computed once when
the agent starts (no import of PyTorch): the allow list
(:func:`~edge_agent.training.model_spec.allowed_models`: the zoo, the ``fedge.models``
entry points and the owner's ``[training] models``) and whether PyTorch is
installed. Workflow (the :class:`~edge_agent.training.participant.Participant`)::

    models = DeviceModels(config.training.models, torch_threads=config.training.torch_threads)
    status.train_models = models.train_models        # empty without PyTorch
    model = models.check(task)      # worker thread, before the download: typed errors
    trainer = models.trainer(model) # training thread: imports PyTorch for a torch model

A spec not on the allow list is refused whatever its module path says, and nothing is
imported for it: architecture code never arrives over the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edge_agent.errors import (
    TorchUnavailableError,
    UnknownModelError,
)
from edge_agent.protocol import TrainTask
from edge_agent.training.model_spec import (
    TORCH_FAMILY,
    ModelTask,
    allowed_models,
    check_task,
    parse_model_spec,
    torch_available,
)
from edge_agent.training.numpy_trainers import trainer_for
from edge_agent.training.torch_models import parse_model_args
from edge_agent.training.torch_trainer import TorchTrainer
from edge_agent.training.trainer import Trainer

__all__ = ["DeviceModels", "TaskModel"]


@dataclass(frozen=True)
class TaskModel:
    """A task's model, checked: how to build its trainer.

    Attributes:
        family: The task's family (``"torch"`` or a numpy family).
        spec: The canonical model spec (torch only).
        task: The learning task.
        input_shape: One example's shape (torch only).
        num_outputs: Classes or regression outputs; 0 for reconstruction (torch only).
    """

    family: str
    spec: str = ""
    task: ModelTask = "classification"
    input_shape: tuple[int, ...] = ()
    num_outputs: int = 0


class DeviceModels:
    """The models this device may train (see the module docstring).

    Args:
        configured: The owner's ``[training] models``.
        torch_threads: Threads PyTorch trains with (None: its default).
    """

    def __init__(self, configured: Iterable[str] = (), *, torch_threads: int | None = None) -> None:
        self._allowed = allowed_models(configured)
        self._torch = torch_available()
        self._torch_threads = torch_threads

    @property
    def train_models(self) -> tuple[str, ...]:
        """The specs this device can train, for its status: the allow list when
        PyTorch is installed, else none."""
        return self._allowed if self._torch else ()

    def check(self, task: TrainTask) -> TaskModel:
        """What ``task`` trains, checked without importing anything.

        Raises:
            UnknownModelError: a torch model spec that is malformed or not on this
                device's allow list.
            TorchUnavailableError: an allowed torch model on a device without PyTorch.
            TrainConfigError: an unknown task, or bad ``model_args``.
            TrainingError: no trainer for a built-in family.
        """
        if task.family != TORCH_FAMILY:
            trainer_for(task.family)
            return TaskModel(task.family, task=check_task(task.task))
        spec = str(parse_model_spec(task.model_spec))
        if spec not in self._allowed:
            raise UnknownModelError(
                f"model {spec} is not installed on this device: it trains the zoo, the "
                "fedge.models entry points and [training] models only"
            )
        if not self._torch:
            raise TorchUnavailableError(
                f"model {spec} needs PyTorch, which this device lacks (pip install 'fedge[torch]')"
            )
        input_shape, num_outputs = parse_model_args(task.model_args)
        return TaskModel(TORCH_FAMILY, spec, check_task(task.task), input_shape, num_outputs)

    def trainer(self, model: TaskModel) -> Trainer:
        """A fresh trainer for a checked model (imports PyTorch for a torch model).

        Raises:
            TrainingError: the trainer cannot be built (an unknown family; for torch,
                see ``TorchTrainer``).
        """
        if model.family != TORCH_FAMILY:
            return trainer_for(model.family)
        # Building the trainer imports PyTorch, which only a torch task may load.
        return TorchTrainer(
            model.spec,
            task=model.task,
            input_shape=model.input_shape,
            num_outputs=model.num_outputs,
            num_threads=self._torch_threads,
        )
