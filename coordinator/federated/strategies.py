"""Flower strategies by name, with typed ``key=value`` arguments.

``fedge train --strategy NAME [--strategy-arg k=v ...]`` picks an aggregation
strategy. NAME is one of :data:`BUILTIN_STRATEGIES` (Flower's Message-API classes
from ``flwr.serverapp.strategy``) or ``module:Class`` naming any class that
implements Flower's ``Strategy`` interface (constructed with the arguments as
keywords). Arguments are parsed by :func:`parse_strategy_args`: ``true``/``false``
become bools, then int, then float, else the text.

fedge samples the round's devices itself (seeded, ``--clients-per-round``) and hands
the strategy exactly those through its :class:`~coordinator.federated.grid.MqttGrid`, so
built-in strategies are built to train and evaluate on every node the grid offers
(``fraction_train=1``, ``min_*_nodes=1``); the run enforces ``--min-clients``.
Arguments given by the user override these defaults.

:func:`wrap_dp` wraps any strategy in Flower's server-side differential-privacy
wrapper (fixed clipping), unchanged.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from coordinator.errors import StrategyError

__all__ = [
    "BUILTIN_STRATEGIES",
    "StrategyArgs",
    "build_strategy",
    "parse_strategy_args",
    "wrap_dp",
]

StrategyArgs = dict[str, bool | int | float | str]

BUILTIN_STRATEGIES: Mapping[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}


def _value(text: str) -> bool | int | float | str:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def parse_strategy_args(pairs: Sequence[str]) -> StrategyArgs:
    """Parse ``key=value`` strings (``k-e-y`` and ``k_e_y`` are the same key).

    Raises:
        StrategyError: an item without ``=`` or with an empty or invalid key.
    """
    args: StrategyArgs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise StrategyError(f"strategy argument {pair!r} is not key=value")
        args[key] = _value(value)
    return args


def _load_class(spec: str) -> type[Any]:
    module_name, _, class_name = spec.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise StrategyError(f"{spec!r} is not module:Class (an absolute module path)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StrategyError(f"cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise StrategyError(f"{module_name!r} has no class {class_name!r}")
    return cls


def build_strategy(name: str, args: StrategyArgs, *, federated_eval: bool = True) -> Strategy:
    """A Flower strategy from its name and arguments.

    Args:
        name: A key of :data:`BUILTIN_STRATEGIES` or ``module:Class``.
        args: Keyword arguments for the class (override fedge's defaults).
        federated_eval: Whether devices evaluate each round's model (built-ins get
            ``fraction_evaluate=0`` otherwise).

    Returns:
        The strategy.

    Raises:
        StrategyError: an unknown name, a class that is not a Flower ``Strategy``,
            or arguments the class refuses.
    """
    if ":" in name:
        cls: type[Any] = _load_class(name)
        kwargs: dict[str, Any] = dict(args)
    else:
        builtin = BUILTIN_STRATEGIES.get(name.lower())
        if builtin is None:
            known = ", ".join(BUILTIN_STRATEGIES)
            raise StrategyError(f"unknown strategy {name!r}; use one of {known} or module:Class")
        cls = builtin
        kwargs = {
            "fraction_train": 1.0,
            "fraction_evaluate": 1.0 if federated_eval else 0.0,
            "min_train_nodes": 1,
            "min_evaluate_nodes": 1,
            "min_available_nodes": 1,
            **args,
        }
    if not issubclass(cls, Strategy):
        raise StrategyError(f"{name} is not a Flower Message-API Strategy")
    try:
        strategy: Strategy = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"{name}: {exc}") from exc
    return strategy


def wrap_dp(
    strategy: Strategy, *, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int
) -> Strategy:
    """Wrap a strategy in Flower's server-side fixed-clipping differential privacy.

    Raises:
        StrategyError: values Flower refuses.
    """
    try:
        return DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=noise_multiplier,
            clipping_norm=clipping_norm,
            num_sampled_clients=num_sampled_clients,
        )
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"differential privacy: {exc}") from exc
