"""Which user models a device may train: model specs, tasks and the allow list.

A PyTorch model is named by a **model spec**, ``module.path:function``: a factory
that returns an ``nn.Module``. Architecture code never travels over the network:
a device trains a spec only when the code is *installed* on it and the device
owner has allowed it. The allow list (:func:`allowed_models`) is, in order:

* the built-in zoo (:data:`ZOO`, ``edge_agent.training.zoo``), whose short form
  ``zoo:<name>`` :func:`parse_model_spec` expands;
* entry points of the group ``fedge.models`` declared by installed packages
  (``[project.entry-points."fedge.models"] small_cnn = "mypkg.models:small_cnn"``);
* the ``models`` list of the agent config's ``[training]`` table.

A device reports the list in its status (``train_models``) only when PyTorch is
installed (checked with :func:`torch_available`, without importing it), and the
coordinator samples for a torch run only devices that list its spec. A task whose
spec is not on the list is refused with :class:`~edge_agent.errors.UnknownModelError`
(code ``unknown_model``), whatever the module path says: nothing is imported for it.

Tasks (:data:`ModelTask`): ``classification`` (class indices, softmax output),
``regression`` (float targets) and ``reconstruction`` (no targets; the deployed
model outputs an anomaly score). Pure: no torch, no I/O beyond reading package
metadata.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from edge_agent.errors import TrainConfigError, UnknownModelError
from edge_agent.protocol.messages_base import MODEL_SPEC_MAX_CHARS, MODEL_SPEC_RE

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASKS",
    "TORCH_FAMILY",
    "ZOO",
    "ZOO_MODULE",
    "ModelSpec",
    "ModelTask",
    "allowed_models",
    "check_task",
    "parse_model_spec",
    "torch_available",
]

logger = logging.getLogger(__name__)

ModelTask = Literal["classification", "regression", "reconstruction"]
TASKS: tuple[str, ...] = get_args(ModelTask)

TORCH_FAMILY = "torch"
"""The ``family`` of train tasks whose model is a PyTorch factory."""

ENTRY_POINT_GROUP = "fedge.models"
"""Entry-point group through which installed packages offer model factories."""

ZOO_MODULE = "edge_agent.training.zoo"
ZOO: tuple[str, ...] = ("small_cnn", "sensor_cnn", "dense_autoencoder", "mlp_regressor")
"""Factories of the built-in zoo (``zoo:<name>`` is short for ``<ZOO_MODULE>:<name>``)."""


def check_task(text: str) -> ModelTask:
    """Return ``text`` as a :data:`ModelTask`.

    Raises:
        TrainConfigError: not one of :data:`TASKS`.
    """
    for task in get_args(ModelTask):
        if text == task:
            return task  # type: ignore[no-any-return]
    raise TrainConfigError(f"unknown task {text!r}; expected one of {', '.join(TASKS)}")


@dataclass(frozen=True, order=True)
class ModelSpec:
    """A model factory: ``module`` (dotted path) and ``function`` in it."""

    module: str
    function: str

    def __str__(self) -> str:
        """``module:function``."""
        return f"{self.module}:{self.function}"

    @property
    def name(self) -> str:
        """A model name derived from the factory (``small_cnn`` -> ``small-cnn``)."""
        return self.function.replace("_", "-").lower()[:64]


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``module.path:function`` (or ``zoo:<name>``).

    Raises:
        UnknownModelError: not of that form, too long, or an unknown zoo name.
    """
    if not isinstance(text, str) or len(text) > MODEL_SPEC_MAX_CHARS:
        raise UnknownModelError(f"a model spec is at most {MODEL_SPEC_MAX_CHARS} characters")
    text = text.strip()
    if not MODEL_SPEC_RE.fullmatch(text):
        raise UnknownModelError(
            f"model spec {text!r} must be module.path:function (e.g. mypkg.models:small_cnn "
            f"or zoo:small_cnn)"
        )
    module, function = text.split(":")
    if module == "zoo":
        if function not in ZOO:
            raise UnknownModelError(f"the zoo has no model {function!r}; it has {', '.join(ZOO)}")
        module = ZOO_MODULE
    return ModelSpec(module, function)


def torch_available() -> bool:
    """Whether PyTorch is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _entry_point_specs() -> list[str]:
    found: list[str] = []
    try:
        entries = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # noqa: BLE001 - broken metadata must not stop an agent
        logger.warning("cannot read %s entry points: %s", ENTRY_POINT_GROUP, exc)
        return found
    for entry in entries:
        found.append(entry.value)
    return found


def allowed_models(configured: Iterable[str] = (), *, entry_points: bool = True) -> tuple[str, ...]:
    """The model specs this device may train, canonical and sorted.

    Args:
        configured: The agent config's ``[training] models``.
        entry_points: Include factories offered by installed packages.

    Returns:
        The zoo, the entry points and ``configured``; a malformed entry is
        skipped with a warning (the agent still starts).
    """
    specs = {ModelSpec(ZOO_MODULE, name) for name in ZOO}
    candidates = [*(_entry_point_specs() if entry_points else []), *configured]
    for text in candidates:
        try:
            specs.add(parse_model_spec(text))
        except UnknownModelError as exc:
            logger.warning("ignoring model %r: %s", text, exc)
    return tuple(str(spec) for spec in sorted(specs))
