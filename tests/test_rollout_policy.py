"""The staged-rollout policy: parsers, validation, stage sizes, JSON round trip."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.errors import CoordinatorError, RolloutError
from coordinator.rollout.policy import (
    CanarySize,
    HealthPolicy,
    RolloutPolicy,
    parse_duration,
    parse_fraction,
    parse_waves,
)


def test_rollout_error_is_in_the_coordinator_tree() -> None:
    assert issubclass(RolloutError, CoordinatorError)
    assert RolloutError.code == "rollout_error"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60s", 60.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("90", 90.0),
        (" 1.5h ", 5400.0),
        ("0", 0.0),
        ("30d", 30 * 86400.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5", "5x", "m", "1e3", "5 minutes", "5w", "nan"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(RolloutError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("10%", 0.1),
        ("0.1", 0.1),
        ("0", 0.0),
        ("0%", 0.0),
        ("100%", 1.0),
        ("1", 1.0),
        ("12.5%", 0.125),
    ],
)
def test_parse_fraction(text: str, share: float) -> None:
    assert parse_fraction(text) == pytest.approx(share)


def test_parse_fraction_suggests_a_percent_for_a_bare_number_above_one() -> None:
    with pytest.raises(RolloutError, match="did you mean '10%'"):
        parse_fraction("10")


@pytest.mark.parametrize("text", ["110%", "abc", "-0.1", "", "%", "1.5"])
def test_parse_fraction_refuses(text: str) -> None:
    with pytest.raises(RolloutError, match="bad share"):
        parse_fraction(text)


def test_canary_parse() -> None:
    assert CanarySize.parse("2") == CanarySize(count=2)
    assert CanarySize.parse(" 5% ") == CanarySize(fraction=0.05)
    assert str(CanarySize.parse("2")) == "2"
    assert str(CanarySize.parse("5%")) == "5%"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "at least 1 device"),
        ("0%", "above 0%"),
        ("150%", "at most 100%"),
        ("2.5", "whole number of devices"),
        ("two", "whole number of devices"),
        ("", "whole number of devices"),
    ],
)
def test_canary_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(RolloutError, match=message):
        CanarySize.parse(text)


def test_canary_constructor_validates() -> None:
    with pytest.raises(RolloutError, match="either"):
        CanarySize()
    with pytest.raises(RolloutError, match="either"):
        CanarySize(count=1, fraction=0.5)
    with pytest.raises(RolloutError):
        CanarySize(count=0)
    with pytest.raises(RolloutError):
        CanarySize(fraction=math.nan)


@pytest.mark.parametrize(
    ("canary", "n", "size"),
    [
        (CanarySize(fraction=0.05), 30, 2),  # 1.5 rounds up
        (CanarySize(fraction=0.05), 20, 1),  # exactly 1, no float noise
        (CanarySize(fraction=0.05), 1, 1),  # at least one device
        (CanarySize(fraction=0.1), 30, 3),  # 0.1 * 30 is 3.0000000000000004 in floats
        (CanarySize(count=5), 3, 3),  # capped at the target
        (CanarySize(count=2), 0, 0),
        (CanarySize(fraction=0.5), 0, 0),
    ],
)
def test_canary_devices(canary: CanarySize, n: int, size: int) -> None:
    assert canary.devices(n) == size


@pytest.mark.parametrize(
    ("text", "waves"),
    [
        ("25,50,100", (0.25, 0.5, 1.0)),
        (" 25% , 50%,100% ", (0.25, 0.5, 1.0)),
        ("100", (1.0,)),
        ("12.5,100", (0.125, 1.0)),
    ],
)
def test_parse_waves(text: str, waves: tuple[float, ...]) -> None:
    assert parse_waves(text) == waves


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("25,50", "must be 100%"),  # refused, not extended
        ("0.25,0.5,1", "must be 100%"),  # shares where percentages are expected
        ("50,25,100", "increase strictly"),
        ("25,25,100", "increase strictly"),
        ("0,100", r"not a share in \(0, 1\]"),
        ("25,150", r"not a share in \(0, 1\]"),
        ("25,,100", "is not a percentage"),
        ("", "is not a percentage"),
        ("a,100", "is not a percentage"),
    ],
)
def test_parse_waves_refuses(text: str, message: str) -> None:
    with pytest.raises(RolloutError, match=message):
        parse_waves(text)


def policy(canary: str = "1", waves: str = "100") -> RolloutPolicy:
    return RolloutPolicy.parse(canary=canary, waves=waves)


@pytest.mark.parametrize(
    ("canary", "waves", "n", "sizes"),
    [
        ("2", "50,100", 20, (2, 8, 10)),
        ("2", "50,100", 1, (1,)),
        ("1", "25,50,100", 1, (1,)),
        ("5%", "100", 30, (2, 28)),
        ("5", "10,100", 20, (5, 15)),  # the 10% wave adds nobody: dropped
        ("1", "10,100", 30, (1, 2, 27)),  # ceil(0.1 * 30) is 3, not 4
        ("25", "50,100", 20, (20,)),
        ("1", "100", 0, ()),
    ],
)
def test_stage_sizes(canary: str, waves: str, n: int, sizes: tuple[int, ...]) -> None:
    assert policy(canary, waves).stage_sizes(n) == sizes


@given(
    n=st.integers(0, 500),
    canary=st.one_of(
        st.builds(CanarySize, count=st.integers(1, 50)),
        st.builds(CanarySize, fraction=st.floats(0.001, 1.0)),
    ),
    cuts=st.lists(st.floats(0.001, 0.999), max_size=5, unique=True),
)
def test_stage_sizes_cover_the_target(n: int, canary: CanarySize, cuts: list[float]) -> None:
    waves = (*sorted(cuts), 1.0)
    sizes = RolloutPolicy(canary=canary, waves=waves).stage_sizes(n)
    assert sum(sizes) == n
    assert all(size > 0 for size in sizes)
    assert len(sizes) <= len(waves) + 1
    if n:
        assert sizes[0] == canary.devices(n)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"soak_s": -1}, "soak"),
        ({"soak_s": math.inf}, "soak"),
        ({"max_failure": 1.5}, "max failure"),
        ({"max_failure": -0.1}, "max failure"),
        ({"min_reports": 0}, "min reports"),
        ({"install_timeout_s": 0}, "install timeout"),
        ({"waves": (0.5,)}, "must be 100%"),
        ({"waves": ()}, "at least one wave"),
        ({"waves": (0.5, math.nan, 1.0)}, "finite"),
    ],
)
def test_policy_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RolloutError, match=message):
        RolloutPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_error_rate": 1.5},
        {"max_error_rate": -0.01},
        {"max_p95_ratio": 0.9},
        {"max_p95_ratio": math.inf},
        {"min_predictions": 0},
        {"min_predictions": True},
    ],
)
def test_health_policy_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(RolloutError, match="health policy"):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]


def test_parse_defaults() -> None:
    parsed = RolloutPolicy.parse()
    assert parsed == RolloutPolicy()
    assert parsed.soak_s == 300.0
    assert parsed.install_timeout_s == 600.0
    assert parsed.max_failure == 0.0
    assert parsed.canary == CanarySize(count=1)
    assert parsed.waves == (1.0,)


def test_parse_all_fields() -> None:
    parsed = RolloutPolicy.parse(
        canary="5%",
        waves="25,50,100",
        soak="1h",
        max_failure="10%",
        min_reports=3,
        rollback_on_halt=False,
        install_timeout="90s",
        health=HealthPolicy(require_health=True),
    )
    assert parsed == RolloutPolicy(
        canary=CanarySize(fraction=0.05),
        waves=(0.25, 0.5, 1.0),
        soak_s=3600.0,
        max_failure=0.1,
        min_reports=3,
        rollback_on_halt=False,
        install_timeout_s=90.0,
        health=HealthPolicy(require_health=True),
    )


@pytest.mark.parametrize(
    "value",
    [
        RolloutPolicy(),
        RolloutPolicy.parse(canary="5%", waves="12.5,50,100", soak="90", max_failure="0.25"),
        RolloutPolicy(
            canary=CanarySize(count=3),
            soak_s=60,
            min_reports=2,
            rollback_on_halt=False,
            health=HealthPolicy(0.1, 2.0, 20, require_health=True),
        ),
    ],
)
def test_policy_json_round_trip(value: RolloutPolicy) -> None:
    data = json.loads(json.dumps(value.to_json()))
    assert RolloutPolicy.from_json(data) == value
    assert RolloutPolicy.from_json(data).to_json() == value.to_json()


def test_integers_are_normalised_to_floats() -> None:
    value = RolloutPolicy(soak_s=60, waves=(1,), max_failure=0)
    assert isinstance(value.soak_s, float)
    assert isinstance(value.waves[0], float)
    assert json.dumps(value.to_json()) == json.dumps(
        RolloutPolicy.from_json(value.to_json()).to_json()
    )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("soak_s"),
        lambda d: d.update(canary={"count": 1, "fraction": 0.5}),
        lambda d: d.update(canary={"devices": 1}),
        lambda d: d.update(health={"max_error_rate": 0.1, "bogus": 1}),
        lambda d: d.update(waves="25,100"),
        lambda d: d.update(max_failure="10%"),
    ],
)
def test_policy_from_json_refuses_malformed_data(mutate: object) -> None:
    data = RolloutPolicy().to_json()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(RolloutError):
        RolloutPolicy.from_json(data)
