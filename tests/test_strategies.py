"""coordinator.federated.strategies: Flower strategies by name, typed arguments, DP wrapping."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from coordinator.errors import RunError, StrategyError
from coordinator.federated.strategies import (
    BUILTIN_STRATEGIES,
    StrategyArgs,
    build_strategy,
    parse_strategy_args,
    wrap_dp,
)


@pytest.fixture(autouse=True)
def _quiet_flower() -> Iterator[None]:
    """Flower logs a warning for fraction_evaluate=0 and proximal_mu=0; not our concern."""
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    yield
    flwr_logger.setLevel(level)


def built(name: str, args: StrategyArgs | None = None, **kwargs: bool) -> FedAvg:
    """A built-in (all are FedAvg subclasses), typed so its settings can be read."""
    strategy = build_strategy(name, args or {}, **kwargs)
    assert isinstance(strategy, FedAvg)
    return strategy


# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name", list(BUILTIN_STRATEGIES))
@pytest.mark.parametrize("federated_eval", [True, False])
def test_every_builtin_builds_with_fedge_defaults(name: str, federated_eval: bool) -> None:
    strategy = built(name, federated_eval=federated_eval)
    assert type(strategy) is BUILTIN_STRATEGIES[name]
    assert isinstance(strategy, Strategy)
    assert strategy.fraction_train == 1.0
    assert strategy.fraction_evaluate == (1.0 if federated_eval else 0.0)
    assert strategy.min_train_nodes == 1
    # Flower itself sets min_evaluate_nodes to 0 when fraction_evaluate is 0
    assert strategy.min_evaluate_nodes == (1 if federated_eval else 0)
    assert strategy.min_available_nodes == 1


def test_federated_eval_is_the_default() -> None:
    assert built("fedavg").fraction_evaluate == 1.0


def test_builtin_names_are_case_insensitive() -> None:
    assert type(build_strategy("FedAvg", {})) is FedAvg
    assert type(build_strategy("MULTIKRUM", {})) is MultiKrum


def test_user_arguments_override_the_defaults() -> None:
    strategy = built(
        "fedavg",
        {"fraction_train": 0.5, "min_train_nodes": 3, "fraction_evaluate": 0.25},
        federated_eval=False,
    )
    assert strategy.fraction_train == 0.5
    assert strategy.min_train_nodes == 3
    assert strategy.fraction_evaluate == 0.25
    assert strategy.min_available_nodes == 1  # untouched defaults stay


@pytest.mark.parametrize(
    ("name", "args", "attribute", "cls"),
    [
        ("fedprox", {"proximal_mu": 0.1}, "proximal_mu", FedProx),
        ("fedtrimmedavg", {"beta": 0.1}, "beta", FedTrimmedAvg),
        ("krum", {"num_malicious_nodes": 1}, "num_malicious_nodes", Krum),
        ("multikrum", {"num_malicious_nodes": 2}, "num_malicious_nodes", MultiKrum),
        ("multikrum", {"num_nodes_to_select": 3}, "num_nodes_to_select", MultiKrum),
        ("bulyan", {"num_malicious_nodes": 1}, "num_malicious_nodes", Bulyan),
    ],
)
def test_strategy_specific_arguments_reach_the_class(
    name: str, args: dict[str, float | int], attribute: str, cls: type[Strategy]
) -> None:
    strategy = build_strategy(name, dict(args))
    assert type(strategy) is cls
    assert getattr(strategy, attribute) == next(iter(args.values()))


def test_parsed_arguments_build_a_strategy() -> None:
    args = parse_strategy_args(["num-malicious-nodes=1", "fraction-train=0.5"])
    strategy = build_strategy("krum", args)
    assert isinstance(strategy, Krum)
    assert strategy.num_malicious_nodes == 1
    assert strategy.fraction_train == 0.5


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(StrategyError) as info:
        build_strategy("fedsgd", {})
    message = str(info.value)
    assert "'fedsgd'" in message
    for name in BUILTIN_STRATEGIES:
        assert name in message
    assert "module:Class" in message
    assert isinstance(info.value, RunError)


@pytest.mark.parametrize(
    "args",
    [
        {"no_such_argument": 1},
        {"weighted-by-key": "x"},  # not normalised here: parse_strategy_args does that
    ],
)
def test_arguments_the_class_does_not_take(args: dict[str, int | str]) -> None:
    with pytest.raises(StrategyError) as info:
        build_strategy("fedavg", dict(args))
    assert str(info.value).startswith("fedavg: ")


def test_values_the_class_refuses() -> None:
    with pytest.raises(StrategyError, match="fedtrimmedavg"):
        build_strategy("fedtrimmedavg", {"beta": 0.9})


# --------------------------------------------------------------------------- module:Class


def test_module_class_loads_a_flower_strategy_without_fedge_defaults() -> None:
    strategy = build_strategy("flwr.serverapp.strategy:FedAvg", {}, federated_eval=False)
    assert type(strategy) is FedAvg
    # a user class gets exactly the user's arguments: Flower's own defaults apply
    default = FedAvg()
    assert strategy.min_train_nodes == default.min_train_nodes
    assert strategy.fraction_evaluate == default.fraction_evaluate


def test_module_class_receives_the_arguments() -> None:
    strategy = build_strategy(
        "flwr.serverapp.strategy:FedProx", {"proximal_mu": 0.5, "min_train_nodes": 4}
    )
    assert type(strategy) is FedProx
    assert strategy.proximal_mu == 0.5
    assert strategy.min_train_nodes == 4


@pytest.mark.parametrize(
    "spec", ["collections:OrderedDict", "coordinator.errors:StrategyError", "builtins:object"]
)
def test_module_class_that_is_not_a_strategy(spec: str) -> None:
    with pytest.raises(StrategyError, match="not a Flower"):
        build_strategy(spec, {})


@pytest.mark.parametrize(
    "spec",
    [
        "no_such_module_for_fedge_tests:Strategy",
        "coordinator.no_such_module:Strategy",
    ],
)
def test_module_that_does_not_exist(spec: str) -> None:
    with pytest.raises(StrategyError, match="cannot import"):
        build_strategy(spec, {})


@pytest.mark.parametrize(
    "spec",
    [
        "flwr.serverapp.strategy:NoSuchStrategy",
        "flwr.serverapp.strategy:",
        "math:pi",  # an attribute, not a class
    ],
)
def test_module_without_that_class(spec: str) -> None:
    with pytest.raises(StrategyError, match="has no class"):
        build_strategy(spec, {})


@pytest.mark.parametrize("spec", [":FedAvg", ".strategy:FedAvg", "flwr..serverapp:FedAvg"])
def test_unloadable_module_names_are_strategy_errors(spec: str) -> None:
    """Typos in --strategy are user input: one StrategyError, not a traceback."""
    with pytest.raises(StrategyError):
        build_strategy(spec, {})


def test_abstract_strategy_class_is_refused() -> None:
    with pytest.raises(StrategyError, match=r"flwr\.serverapp\.strategy:Strategy"):
        build_strategy("flwr.serverapp.strategy:Strategy", {})


def test_module_class_with_bad_arguments() -> None:
    with pytest.raises(StrategyError) as info:
        build_strategy("flwr.serverapp.strategy:FedAvg", {"no_such_argument": True})
    assert "no_such_argument" in str(info.value)


# --------------------------------------------------------------------------- arguments


def test_parse_values_are_typed() -> None:
    args = parse_strategy_args(
        [
            "a=true",
            "b=False",
            "c=3",
            "d=-7",
            "e=0.25",
            "f=1e-3",
            "g=weights",
            "h=",
            "i=x=y",
        ]
    )
    assert args == {
        "a": True,
        "b": False,
        "c": 3,
        "d": -7,
        "e": 0.25,
        "f": 0.001,
        "g": "weights",
        "h": "",
        "i": "x=y",
    }
    assert type(args["a"]) is bool
    assert type(args["c"]) is int
    assert type(args["e"]) is float
    assert type(args["f"]) is float


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "Infinity"])
def test_non_finite_numbers_stay_text(text: str) -> None:
    assert parse_strategy_args([f"x={text}"]) == {"x": text}


def test_dashes_in_keys_become_underscores() -> None:
    assert parse_strategy_args(["k-e-y=1", " min-train-nodes =2"]) == {
        "k_e_y": 1,
        "min_train_nodes": 2,
    }


def test_later_duplicates_win() -> None:
    assert parse_strategy_args(["k-e-y=1", "k_e_y=2"]) == {"k_e_y": 2}


def test_no_arguments() -> None:
    assert parse_strategy_args([]) == {}


@pytest.mark.parametrize("pair", ["novalue", "=3", " =3", "1abc=2", "a b=1", "a.b=1", "a:b=1"])
def test_malformed_pairs(pair: str) -> None:
    with pytest.raises(StrategyError) as info:
        parse_strategy_args(["ok=1", pair])
    assert repr(pair) in str(info.value)


# --------------------------------------------------------------------------- wrap_dp


def test_wrap_dp_wraps_the_strategy() -> None:
    inner = build_strategy("fedavg", {})
    wrapped = wrap_dp(inner, noise_multiplier=0.5, clipping_norm=2.0, num_sampled_clients=7)
    assert isinstance(wrapped, DifferentialPrivacyServerSideFixedClipping)
    assert wrapped.strategy is inner
    assert wrapped.noise_multiplier == 0.5
    assert wrapped.clipping_norm == 2.0
    assert wrapped.num_sampled_clients == 7


@pytest.mark.parametrize(
    ("noise", "clip", "clients", "what"),
    [
        (-1.0, 1.0, 3, "noise multiplier"),
        (1.0, 0.0, 3, "clipping norm"),
        (1.0, -1.0, 3, "clipping norm"),
        (1.0, 1.0, 0, "sampled clients"),
    ],
)
def test_wrap_dp_refuses_bad_values(noise: float, clip: float, clients: int, what: str) -> None:
    with pytest.raises(StrategyError, match="differential privacy") as info:
        wrap_dp(
            build_strategy("fedavg", {}),
            noise_multiplier=noise,
            clipping_norm=clip,
            num_sampled_clients=clients,
        )
    assert what in str(info.value)
