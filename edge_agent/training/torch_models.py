"""PyTorch models on the device: build a factory's module, and move its weights in and out.

A torch model is named by a model spec (:mod:`edge_agent.training.model_spec`):
``module.path:function``, a factory returning an ``nn.Module``. The workflow::

    input_shape, num_outputs = parse_model_args(task.model_args)   # TrainConfigError
    module = build_module(spec, input_shape=input_shape, num_outputs=num_outputs,
                          task="classification")                    # UnknownModelError ...
    load_module_weights(module, global_weights)                     # TrainingError
    ... train ...
    update = module_weights(module)

:func:`build_module` imports the factory's module with :mod:`importlib` and calls
the factory with those of the keyword arguments ``input_shape``, ``num_outputs``
and ``task`` that its signature accepts (all three for ``**kwargs``). It does not
check the device's allow list: the caller (the round participant, the
coordinator) does that *before* asking for a module, so nothing is imported for a
spec the device owner did not allow.

**The weights layout (the wire format of a torch model).** Weights travel as
named float32 arrays, exactly like the built-in families' ``W0, b0, ...``:
the module's ``state_dict`` names, in ``state_dict`` order, each array of the
tensor's shape. Floating-point *buffers* are included (BatchNorm's
``running_mean`` and ``running_var``: they are averaged like parameters), integer
and boolean buffers are excluded (BatchNorm's ``num_batches_tracked`` stays
whatever the device's module holds; it only matters for a momentum of None).
Non-persistent buffers are not in a ``state_dict`` and do not travel. Loading
(:func:`load_module_weights`) is strict: every floating-point entry must be given,
nothing else, each of its exact shape.

PyTorch is imported only inside the functions that need it (:func:`require_torch`),
so importing this module (and ``edge_agent``) does not load it; without PyTorch
every function that needs it raises
:class:`~edge_agent.errors.TorchUnavailableError`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.errors import (
    TorchUnavailableError,
    TrainConfigError,
    TrainingError,
    UnknownModelError,
)
from edge_agent.training.model_spec import ModelSpec, ModelTask, check_task, parse_model_spec
from edge_agent.training.trainer import MAX_CLASSES, ConfigValue, FloatArray

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_INPUT_RANK",
    "build_module",
    "factory_task",
    "initial_weights",
    "load_module_weights",
    "model_args_of",
    "module_weights",
    "parse_model_args",
    "require_torch",
]

MAX_INPUT_RANK = 8
"""Most dimensions one example may have (``input_shape``)."""

_MAX_DIM = 1 << 24


def require_torch() -> None:
    """Import :mod:`torch` (then ``import torch`` is cheap), or say why it cannot be.

    Raises:
        TorchUnavailableError: PyTorch is not installed (or fails to import).
    """
    try:
        importlib.import_module("torch")
    except ImportError as exc:
        raise TorchUnavailableError(
            f"PyTorch is not installed on this device ({exc}); install fedge[torch] "
            "(the CPU build of torch) to train PyTorch models"
        ) from exc


# ------------------------------------------------------------------------- model args


def _check_shape(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of 1..MAX_INPUT_RANK dimensions, each >= 1."""
    if isinstance(shape, str):
        parts = [p.strip() for p in shape.split(",")]
        if not all(p.isdigit() for p in parts):
            raise TrainConfigError(
                f"input_shape must be comma-separated positive integers like '1,28,28', "
                f"got {shape!r}"
            )
        dims: list[object] = [int(p) for p in parts]
    elif isinstance(shape, int) and not isinstance(shape, bool):
        dims = [shape]
    elif isinstance(shape, tuple | list):
        dims = list(shape)
    else:
        raise TrainConfigError(f"input_shape must be text like '1,28,28', got {shape!r}")
    if not 1 <= len(dims) <= MAX_INPUT_RANK:
        raise TrainConfigError(
            f"input_shape must have 1 to {MAX_INPUT_RANK} dimensions, got {len(dims)}"
        )
    for dim in dims:
        is_int = isinstance(dim, int | np.integer) and not isinstance(dim, bool)
        if not is_int or not 1 <= dim <= _MAX_DIM:  # type: ignore[operator]
            raise TrainConfigError(
                f"input_shape dimensions must be integers from 1 to {_MAX_DIM}, got {shape!r}"
            )
    return tuple(int(d) for d in dims)  # type: ignore[call-overload]


def _check_outputs(num_outputs: object) -> int:
    if (
        isinstance(num_outputs, bool)
        or not isinstance(num_outputs, int | np.integer)
        or not 0 <= num_outputs <= MAX_CLASSES
    ):
        raise TrainConfigError(
            f"num_outputs must be an integer from 0 to {MAX_CLASSES}, got {num_outputs!r}"
        )
    return int(num_outputs)


def parse_model_args(args: Mapping[str, ConfigValue]) -> tuple[tuple[int, ...], int]:
    """Read ``input_shape`` and ``num_outputs`` from a train task's ``model_args``.

    ``input_shape`` is text (``"1,28,28"``; an int for rows); ``num_outputs`` an
    int, 0 (or missing) where the task has no output width (reconstruction).
    Other keys are ignored.

    Returns:
        ``(input_shape, num_outputs)``.

    Raises:
        TrainConfigError: ``input_shape`` is missing or malformed, or
            ``num_outputs`` is not an integer in ``[0, MAX_CLASSES]``.
    """
    if "input_shape" not in args:
        raise TrainConfigError("model_args has no input_shape (e.g. '1,28,28')")
    return _check_shape(args["input_shape"]), _check_outputs(args.get("num_outputs", 0))


def model_args_of(input_shape: tuple[int, ...], num_outputs: int) -> dict[str, ConfigValue]:
    """The ``model_args`` of a train task: ``{"input_shape": "1,28,28", "num_outputs": 10}``.

    :func:`parse_model_args` reads them back.

    Raises:
        TrainConfigError: As :func:`parse_model_args`.
    """
    shape = _check_shape(tuple(input_shape))
    text = ",".join(str(d) for d in shape)
    return {"input_shape": text, "num_outputs": _check_outputs(num_outputs)}


# ---------------------------------------------------------------------------- factories


def _as_spec(spec: ModelSpec | str) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)


def _factory(spec: ModelSpec) -> Callable[..., Any]:
    """Import ``spec``'s module and return its factory.

    Raises:
        UnknownModelError: The module or the function does not exist, or is not callable.
        TorchUnavailableError: The module needs PyTorch, which is not installed.
        TrainingError: Importing the module failed otherwise.
    """
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == "torch" or missing.startswith("torch."):
            raise TorchUnavailableError(
                f"model {spec} needs PyTorch, which is not installed; install fedge[torch]"
            ) from exc
        if missing and (spec.module == missing or spec.module.startswith(missing + ".")):
            raise UnknownModelError(
                f"model {spec}: no module {spec.module!r} is installed here"
            ) from exc
        raise TrainingError(f"model {spec}: importing {spec.module} failed: {exc}") from exc
    except Exception as exc:  # user code may raise anything on import
        raise TrainingError(f"model {spec}: importing {spec.module} failed: {exc!r}") from exc
    factory = getattr(module, spec.function, None)
    if factory is None:
        raise UnknownModelError(f"model {spec}: module {spec.module} has no {spec.function!r}")
    if not callable(factory):
        raise UnknownModelError(f"model {spec}: {spec.function!r} is not a function")
    return factory  # type: ignore[no-any-return]


def factory_task(spec: ModelSpec | str) -> ModelTask | None:
    """The task a factory declares with its attribute ``task``, or None if it declares none.

    Imports the factory's module (not necessarily PyTorch: the zoo imports it lazily).

    Raises:
        UnknownModelError: As :func:`build_module`; or the spec is malformed.
        TorchUnavailableError: The module needs PyTorch, which is not installed.
        TrainingError: Importing failed otherwise, or ``task`` is not a known task.
    """
    parsed = _as_spec(spec)
    task = getattr(_factory(parsed), "task", None)
    if task is None:
        return None
    if not isinstance(task, str):
        raise TrainingError(f"model {parsed}: its task attribute must be text, got {task!r}")
    try:
        return check_task(task)
    except TrainConfigError as exc:
        raise TrainingError(f"model {parsed} declares {exc}") from exc


def _accepted_kwargs(factory: Callable[..., Any], offered: dict[str, object]) -> dict[str, object]:
    """Those of ``offered`` that ``factory``'s signature takes by keyword."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): offer everything
        return offered
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return offered
    keyword = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {name: value for name, value in offered.items() if name in keyword}


def build_module(
    spec: ModelSpec | str,
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    task: ModelTask,
) -> torch.nn.Module:
    """Import ``spec`` and call its factory.

    The factory gets those of ``input_shape``, ``num_outputs`` and ``task`` that it
    accepts as keyword arguments. The module's initial weights come from PyTorch's
    global generator (seed it, or use :func:`initial_weights`).

    Raises:
        TorchUnavailableError: PyTorch is not installed.
        UnknownModelError: The spec is malformed, or its module or function does not exist.
        TrainConfigError: ``input_shape``, ``num_outputs`` or ``task`` is invalid.
        TrainingError: Importing the module or calling the factory failed, or the
            factory returned something that is not an ``nn.Module``.
    """
    require_torch()
    import torch  # noqa: PLC0415 - only when a torch model is built

    parsed = _as_spec(spec)
    offered: dict[str, object] = {
        "input_shape": _check_shape(tuple(input_shape)),
        "num_outputs": _check_outputs(num_outputs),
        "task": check_task(task),
    }
    factory = _factory(parsed)
    kwargs = _accepted_kwargs(factory, offered)
    try:
        module = factory(**kwargs)
    except TrainingError:
        raise
    except Exception as exc:  # user code may raise anything
        raise TrainingError(f"model {parsed}: the factory failed: {exc!r}") from exc
    if not isinstance(module, torch.nn.Module):
        raise TrainingError(
            f"model {parsed}: the factory returned {type(module).__name__}, not a torch.nn.Module"
        )
    return module


# ----------------------------------------------------------------------------- weights


def _float_entries(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's ``state_dict`` entries that travel (see the module docstring).

    Raises:
        TrainingError: An entry is neither real floating point nor integer/boolean
            (complex, quantized): it can travel neither way.
    """
    entries: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            entries[name] = tensor
        elif tensor.is_complex() or tensor.is_quantized:
            raise TrainingError(
                f"state_dict entry {name!r} has dtype {tensor.dtype}; only real float "
                "weights can travel"
            )
    return entries


def module_weights(module: torch.nn.Module) -> dict[str, FloatArray]:
    """The module's weights as float32 numpy copies, in ``state_dict`` order.

    Parameters and floating-point buffers (BatchNorm statistics) are included;
    integer buffers (``num_batches_tracked``) are not.

    Raises:
        TrainingError: A ``state_dict`` entry is complex or quantized.
    """
    require_torch()
    import torch  # noqa: PLC0415 - only when a torch model is used

    out: dict[str, FloatArray] = {}
    for name, tensor in _float_entries(module).items():
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        out[name] = np.array(array, dtype=np.float32, copy=True)
    return out


def _listed(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _names_diff(expected: Mapping[str, object], given: Mapping[str, object]) -> str:
    missing = [n for n in expected if n not in given]
    extra = [n for n in given if n not in expected]
    parts = []
    if missing:
        parts.append(f"missing {_listed(missing)}")
    if extra:
        parts.append(f"unexpected {_listed(extra)}")
    return "; ".join(parts)


def load_module_weights(module: torch.nn.Module, weights: Mapping[str, FloatArray]) -> None:
    """Copy ``weights`` into ``module``: parameters and floating-point buffers.

    ``weights`` are read, never modified; integer buffers keep their values.

    Raises:
        TrainingError: A name is missing or unexpected, an array has the wrong
            shape, is not real numbers, or holds NaN or infinity.
    """
    require_torch()
    import torch  # noqa: PLC0415 - only when a torch model is used

    entries = _float_entries(module)
    if set(entries) != set(weights):
        raise TrainingError(f"weights do not fit the model: {_names_diff(entries, weights)}")
    state: dict[str, torch.Tensor] = {}
    for name, target in entries.items():
        array = np.asarray(weights[name])
        if array.dtype.kind not in "fiu":
            raise TrainingError(f"weight {name!r} must be real numbers, got dtype {array.dtype}")
        if array.shape != tuple(target.shape):
            raise TrainingError(
                f"weight {name!r} has shape {array.shape}, the model expects {tuple(target.shape)}"
            )
        # a copy: torch must not share (possibly read-only) memory with the caller's arrays
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
            values = np.array(array, dtype=np.float32, copy=True)
        if not np.isfinite(values).all():
            raise TrainingError(f"weight {name!r} holds NaN or infinity")
        state[name] = torch.from_numpy(values)
    with torch.no_grad():
        for name, target in entries.items():
            target.copy_(state[name])


def initial_weights(
    spec: ModelSpec | str,
    *,
    task: ModelTask,
    input_shape: tuple[int, ...],
    num_outputs: int,
    seed: int,
) -> dict[str, FloatArray]:
    """The weights of a freshly built module, from PyTorch's generator seeded with ``seed``.

    The same spec, arguments and seed always give the same weights; PyTorch's
    global random state is left as it was.

    Raises:
        TrainConfigError: ``seed`` is negative or above 2**63 - 1.
        TorchUnavailableError, UnknownModelError, TrainingError: As :func:`build_module`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise TrainConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    require_torch()
    import torch  # noqa: PLC0415 - only when a torch model is built

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_module(spec, input_shape=input_shape, num_outputs=num_outputs, task=task)
        return module_weights(module)
