"""coordinator.federated.round_screen: example bounds, norm outliers, robust clipping (pure)."""

from __future__ import annotations

import math

import pytest

from coordinator.federated.round_screen import (
    DEFAULT_NORM_MULTIPLE,
    MIN_UPDATES_FOR_OUTLIERS,
    Admission,
    bounded_examples,
    norm_outliers,
    screen_updates,
)


@pytest.mark.parametrize(
    ("reported", "announced", "cap", "expected"),
    [
        (10, 10, 100_000, 10),  # honest: unchanged
        (10**9, 10, 100_000, 10),  # inflated: the announcement bounds it
        (10**9, 10**9, 100_000, 100_000),  # inflated announcement too: the cap
        (8, 10, 100_000, 8),  # fewer than announced (held-out data): as reported
        (500, None, 100, 100),  # no announcement known: the cap alone
        (50, None, 100, 50),
        (50, 0, 100, 1),  # announced no data: one example, never zero (FedAvg divides)
    ],
)
def test_the_weight_is_the_smallest_of_report_announcement_and_cap(
    reported: int, announced: int | None, cap: int, expected: int
) -> None:
    assert bounded_examples(reported, announced, cap) == expected


def test_an_update_ten_times_over_the_median_norm_is_an_outlier() -> None:
    assert norm_outliers([1.0, 1.2, 0.9, 50.0], DEFAULT_NORM_MULTIPLE) == {3}
    assert norm_outliers([1.0, 1.2, 0.9, 9.9], DEFAULT_NORM_MULTIPLE) == set()
    assert norm_outliers([1.0, 1.0, 10.0], 10.0) == set()  # at the bound: kept
    assert norm_outliers([1.0, 1.0, 10.01], 10.0) == {2}


def test_the_median_resists_several_attackers_below_half() -> None:
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 300.0, 400.0]
    assert norm_outliers(norms, 10.0) == {5, 6}


def test_fewer_than_three_updates_have_no_outliers() -> None:
    assert MIN_UPDATES_FOR_OUTLIERS == 3
    assert norm_outliers([1.0, 1000.0], 10.0) == set()
    assert norm_outliers([1000.0], 10.0) == set()
    assert norm_outliers([], 10.0) == set()


def test_an_infinite_multiple_turns_the_check_off() -> None:
    assert norm_outliers([0.0, 0.0, 5.0], math.inf) == set()
    assert norm_outliers([0.0, 0.0, 5.0], 10.0) == {2}  # a zero median: any motion stands out


def test_screening_without_robust_only_rejects_outliers() -> None:
    admissions = screen_updates([1.0, 2.0, 1.5, 80.0], [10, 20, 30, 40], multiple=10.0,
                                robust=False)  # fmt: skip
    assert admissions == [
        Admission(False, 1.0, 10),
        Admission(False, 1.0, 20),
        Admission(False, 1.0, 30),
        Admission(True, 1.0, 40),
    ]


def test_robust_clips_norms_to_the_median_and_weights_to_the_median_weight() -> None:
    admissions = screen_updates([1.0, 2.0, 4.0], [10, 100_000, 30], multiple=10.0, robust=True)
    assert [a.outlier for a in admissions] == [False, False, False]
    assert [a.scale for a in admissions] == [1.0, 1.0, pytest.approx(0.5)]
    assert [a.weight for a in admissions] == [10, 30, 30]


def test_robust_weights_ignore_the_rejected_outliers() -> None:
    admissions = screen_updates([1.0, 1.0, 1.0, 100.0], [5, 7, 9, 10**5], multiple=10.0,
                                robust=True)  # fmt: skip
    assert admissions[3].outlier
    assert [a.weight for a in admissions[:3]] == [5, 7, 7]


def test_no_updates_no_admissions() -> None:
    assert screen_updates([], [], multiple=10.0, robust=True) == []
