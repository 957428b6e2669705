"""The policy of a staged rollout: typed values, their validation and CLI parsers.

A staged rollout (the engine is :mod:`coordinator.rollout.engine`) releases a model
to a *canary* set first, then to *waves* of the rest of the target. Each stage
must *soak* for a while, hear from enough devices (``min_reports``) and keep its
failure rate at or under ``max_failure`` before the next stage is released;
otherwise the rollout halts and, by default, rolls the failed stage back.

Workflow:

1. The CLI (or the HTTP API) takes the operator's strings and builds a
   :class:`RolloutPolicy` with :meth:`RolloutPolicy.parse`, e.g.
   ``RolloutPolicy.parse(canary="5%", waves="25,50,100", soak="10m",
   max_failure="10%")``; code builds one directly with typed values. Either way the
   values are validated when the object is built, so a bad policy is refused
   before any device is touched.
2. The engine asks :meth:`RolloutPolicy.stage_sizes` how to cut a target of ``N``
   devices into stages, and reads the thresholds while it judges a stage.
3. The service persists the policy with the rollout (:meth:`RolloutPolicy.to_json`,
   restored by :meth:`RolloutPolicy.from_json`).

The string forms (all parsers ignore surrounding whitespace):

* canary: ``"2"`` is two devices, ``"5%"`` is 5 % of the target rounded up (at
  least one device when the target is not empty). A count larger than the target
  takes the whole target.
* waves: cumulative percentages of the whole target (canary included),
  comma-separated, ``"25,50,100"`` (a ``%`` after each number is accepted). They
  must increase strictly and **the last must be 100**: a rollout always ends with
  the whole target, so ``"25,50"`` is refused rather than silently extended (the
  operator may have meant to stop at 50 %, which a rollout does not do).
* durations (soak, install timeout): ``"90"`` or ``"90s"`` seconds, ``"5m"``
  minutes, ``"1h"`` hours; fractions such as ``"1.5h"`` are accepted.
* max failure: ``"10%"`` or ``"0.1"``, between 0 and 1. A bare number above 1 is
  refused (``"10"`` is most likely a forgotten ``%``).

Stage sizes for ``N`` devices: the canary takes ``c`` devices (see
:meth:`CanarySize.devices`); wave ``i`` covers ``max(c, ceil(waves[i] * N))``
devices cumulatively. Waves that would add nobody (the canary already covers them,
or ``N`` is small) are dropped, so every stage holds at least one device: with
``N = 20``, canary ``2`` and waves ``50,100`` the stages hold 2, 8 and 10 devices;
with ``N = 1`` there is a single stage, the canary.

When a stage fails. A stage fails (and the rollout halts) only when BOTH hold:

* its failed devices number at least ``min(min_failed_devices, stage size)``, and
* they are more than ``max_failure`` times the stage: its whole size for the early
  halt (no later report could save it), the devices that reported after the soak.

With the defaults (``min_failed_devices = 2``, ``max_failure = 0``) a canary of one
device halts when that device fails, but in a stage of two or more devices one
failing device alone never halts the rollout (a single broken or hostile device
cannot stop every rollout that includes it); two failures do. ``min_failed_devices
= 1`` restores "any failure halts". A canary of one device can still be halted by
that one device: choose a canary of at least ``min_failed_devices`` devices where
one device must not decide.

Every validation error is a :class:`~coordinator.errors.RolloutError` whose message
names the offending value and the accepted forms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import RolloutError

__all__ = [
    "DEFAULT_MIN_FAILED_DEVICES",
    "CanarySize",
    "HealthPolicy",
    "RolloutPolicy",
    "parse_duration",
    "parse_fraction",
    "parse_waves",
]

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PERCENT_RE = re.compile(rf"({_NUMBER})\s*%")
_COUNT_RE = re.compile(r"\d+")
_FRACTION_RE = re.compile(_NUMBER)
_DURATION_RE = re.compile(rf"({_NUMBER})\s*([smhd]?)")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_EPS = 1e-9

DEFAULT_MIN_FAILED_DEVICES = 2
"""Failed devices a stage of at least that size needs before it can fail."""


def _share_of(fraction: float, n: int) -> int:
    """Give ``ceil(fraction * n)``, immune to float noise (``0.1 * 30`` is 3, not 4).

    Args:
        fraction: A share in [0, 1].
        n: A count.

    Returns:
        The count, rounded up.
    """
    return math.ceil(round(fraction * n, 9))


def _number(value: object, what: str) -> float:
    """Give a finite float, or raise RolloutError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RolloutError(f"bad {what}: {value!r} is not a finite number")
    return float(value)


def _percent(text: str) -> float | None:
    match = _PERCENT_RE.fullmatch(text.strip())
    return None if match is None else float(match.group(1)) / 100.0


def parse_duration(text: str) -> float:
    """Parse a duration: ``"90"``, ``"90s"``, ``"5m"``, ``"1.5h"``, ``"30d"``.

    Args:
        text: The operator's text.

    Returns:
        Seconds (0 allowed).

    Raises:
        RolloutError: The text is not a non-negative number with an optional unit.
    """
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise RolloutError(
            f"bad duration {text!r}: use seconds ('90' or '90s'), minutes ('5m'), "
            "hours ('1h') or days ('30d')"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_fraction(text: str) -> float:
    """Parse a share such as a failure threshold: ``"10%"`` or ``"0.1"``.

    Args:
        text: The operator's text.

    Returns:
        The share, in [0, 1].

    Raises:
        RolloutError: Not a percentage or a number, or outside [0, 1] (a bare
            number above 1 is refused: ``"10"`` is most likely a forgotten ``%``).
    """
    value = _percent(text)
    if value is None:
        if _FRACTION_RE.fullmatch(text.strip()) is None:
            raise RolloutError(f"bad share {text!r}: use a percentage ('10%') or a number ('0.1')")
        value = float(text.strip())
        if value > 1.0:
            raise RolloutError(
                f"bad share {text!r}: a bare number must be between 0 and 1; "
                f"did you mean '{text.strip()}%'?"
            )
    if value > 1.0:
        raise RolloutError(f"bad share {text!r}: at most 100%")
    return value


def _check_waves(waves: tuple[float, ...]) -> None:
    if not waves:
        raise RolloutError("bad waves: give at least one wave; the last must be 100%")
    previous = 0.0
    for wave in waves:
        if not math.isfinite(wave) or not 0.0 < wave <= 1.0:
            raise RolloutError(f"bad waves: {wave:g} is not a share in (0, 1]")
        if wave <= previous:
            raise RolloutError(
                f"bad waves: {', '.join(f'{w:.4g}' for w in waves)} do not increase strictly"
            )
        previous = wave
    if abs(waves[-1] - 1.0) > _EPS:
        raise RolloutError(
            f"bad waves: the last wave covers {waves[-1] * 100:g}% of the target; "
            "it must be 100% (a rollout always ends with the whole target)"
        )


def parse_waves(text: str) -> tuple[float, ...]:
    """Parse cumulative wave percentages: ``"25,50,100"`` gives ``(0.25, 0.5, 1.0)``.

    Each number is a percentage of the whole target (a trailing ``%`` is
    accepted). The last one must be 100: ``"25,50"`` is refused, not extended.

    Args:
        text: The operator's text.

    Returns:
        The shares, strictly increasing, the last 1.0.

    Raises:
        RolloutError: A part is not a percentage, the values do not increase
            strictly, one is outside (0, 100], or the last is not 100.
    """
    waves: list[float] = []
    for part in text.split(","):
        stripped = part.strip()
        value = _percent(stripped if stripped.endswith("%") else f"{stripped}%")
        if value is None:
            raise RolloutError(
                f"bad waves {text!r}: {stripped!r} is not a percentage; "
                "use cumulative percentages such as '25,50,100'"
            )
        waves.append(value)
    try:
        _check_waves(tuple(waves))
    except RolloutError as exc:
        raise RolloutError(f"{exc} (from {text!r})") from None
    return tuple(waves)


@dataclass(frozen=True)
class CanarySize:
    """How many devices the canary stage takes: a count or a share of the target.

    Exactly one of the two attributes is set.

    Attributes:
        count: A number of devices (>= 1), or None.
        fraction: A share of the target in (0, 1], rounded up to whole devices and
            at least one device, or None.

    Raises:
        RolloutError: Neither or both are set, or a value is out of range.
    """

    count: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        """Validate the values."""
        if (self.count is None) == (self.fraction is None):
            raise RolloutError("bad canary: give either a device count or a share")
        if self.count is not None and (
            isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1
        ):
            raise RolloutError(f"bad canary: {self.count!r} devices; at least 1")
        if self.fraction is not None:
            value = _number(self.fraction, "canary share")
            if not 0.0 < value <= 1.0:
                raise RolloutError(f"bad canary: a share of {self.fraction!r} is not in (0, 1]")
            object.__setattr__(self, "fraction", value)

    @classmethod
    def parse(cls, text: str) -> CanarySize:
        """Parse ``"2"`` (devices) or ``"5%"`` (share of the target).

        Args:
            text: The operator's text.

        Returns:
            The canary size.

        Raises:
            RolloutError: Neither a whole number of devices nor a percentage, or
                out of range.
        """
        stripped = text.strip()
        share = _percent(stripped)
        if share is not None:
            if not 0.0 < share <= 1.0:
                raise RolloutError(
                    f"bad canary {text!r}: a share must be above 0% and at most 100%"
                )
            return cls(fraction=share)
        if _COUNT_RE.fullmatch(stripped) is None:
            raise RolloutError(
                f"bad canary {text!r}: use a whole number of devices ('2') or a share ('5%')"
            )
        if int(stripped) < 1:
            raise RolloutError(f"bad canary {text!r}: at least 1 device")
        return cls(count=int(stripped))

    def devices(self, n: int) -> int:
        """Give the canary size for a target of ``n`` devices.

        Args:
            n: Devices in the target.

        Returns:
            ``min(count, n)``, or ``ceil(fraction * n)`` and at least 1; 0 when
            ``n`` is 0.
        """
        if n <= 0:
            return 0
        if self.count is not None:
            return min(self.count, n)
        fraction = 0.0 if self.fraction is None else self.fraction
        return min(n, max(1, _share_of(fraction, n)))

    def __str__(self) -> str:
        """Give the string form, ``"2"`` or ``"5%"``."""
        if self.count is not None:
            return str(self.count)
        return f"{(self.fraction or 0.0) * 100:g}%"

    def to_json(self) -> dict[str, Any]:
        """Give ``{"count": n}`` or ``{"fraction": f}``."""
        if self.count is not None:
            return {"count": self.count}
        return {"fraction": self.fraction}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CanarySize:
        """Rebuild from :meth:`to_json`.

        Raises:
            RolloutError: Malformed data.
        """
        if set(data) not in ({"count"}, {"fraction"}):
            raise RolloutError(f"bad canary: {dict(data)!r}")
        return cls(count=data.get("count"), fraction=data.get("fraction"))


@dataclass(frozen=True)
class HealthPolicy:
    """When a device that installed the new model counts as healthy.

    Each telemetry window of the new version with at least ``min_predictions``
    inference calls (successful and failed ones: the agent counts failed calls
    apart from ``predictions``, and a model failing every call must still be
    judged) is compared with the device's *baseline*: its last five such windows
    of the model it served before, calls summed and the median of their p95s
    (:func:`~coordinator.rollout.health.combine_baseline`).

    Attributes:
        max_error_rate: Largest allowed increase of the error rate (failed calls
            over all calls) over the baseline, absolute (0.05 = 5 points). Without
            a baseline, the largest allowed error rate.
        max_p95_ratio: Largest allowed p95 latency as a multiple of the baseline's
            (>= 1). Not judged without a baseline, or when either window has no
            successful prediction.
        min_predictions: Inference calls a window needs to count at all (>= 1).
        require_health: If False, an installed device counts as a successful
            report at once (a later unhealthy window still turns it into a
            failure); if True, it counts only once a healthy window arrived.

    Raises:
        RolloutError: A value is out of range.
    """

    max_error_rate: float = 0.05
    max_p95_ratio: float = 1.5
    min_predictions: int = 1
    require_health: bool = False

    def __post_init__(self) -> None:
        """Validate the values."""
        rate = _number(self.max_error_rate, "health policy max_error_rate")
        if not 0.0 <= rate <= 1.0:
            raise RolloutError(f"bad health policy: max_error_rate {self.max_error_rate!r}")
        ratio = _number(self.max_p95_ratio, "health policy max_p95_ratio")
        if ratio < 1.0:
            raise RolloutError(
                f"bad health policy: max_p95_ratio {self.max_p95_ratio!r} must be >= 1"
            )
        if (
            isinstance(self.min_predictions, bool)
            or not isinstance(self.min_predictions, int)
            or self.min_predictions < 1
        ):
            raise RolloutError(
                f"bad health policy: min_predictions {self.min_predictions!r} must be >= 1"
            )
        object.__setattr__(self, "max_error_rate", rate)
        object.__setattr__(self, "max_p95_ratio", ratio)
        object.__setattr__(self, "require_health", bool(self.require_health))

    def to_json(self) -> dict[str, Any]:
        """Give a JSON-able dict of every field."""
        return {
            "max_error_rate": self.max_error_rate,
            "max_p95_ratio": self.max_p95_ratio,
            "min_predictions": self.min_predictions,
            "require_health": self.require_health,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HealthPolicy:
        """Rebuild from :meth:`to_json`.

        Raises:
            RolloutError: Malformed data.
        """
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise RolloutError(f"bad health policy: {exc}") from None


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout proceeds through its stages (see the module docstring).

    Attributes:
        canary: Size of the first stage.
        waves: Cumulative shares of the target after the canary, strictly
            increasing in (0, 1], the last 1.0.
        soak_s: Seconds a released stage is watched before the next one may be
            released (>= 0).
        max_failure: Largest failure rate of a stage (failed over reported
            devices) that still lets the rollout advance, in [0, 1]. With the
            default 0, any failure counts once ``min_failed_devices`` is reached.
        min_failed_devices: Fewest failed devices that can fail a stage (>= 1),
            capped at the stage's size; see "When a stage fails" in the module
            docstring.
        min_reports: Devices of a stage that must have reported an outcome before
            it is judged (>= 1; capped at the stage's size).
        rollback_on_halt: Whether a halt rolls back the devices of the failed stage
            that installed the new version.
        install_timeout_s: Seconds an online device may take from the deploy to
            an outcome before it counts as failed (``timed_out``; > 0).
        health: When an installed device counts as healthy.

    Raises:
        RolloutError: A value is out of range.
    """

    canary: CanarySize = field(default_factory=lambda: CanarySize(count=1))
    waves: tuple[float, ...] = (1.0,)
    soak_s: float = 300.0
    max_failure: float = 0.0
    min_reports: int = 1
    rollback_on_halt: bool = True
    install_timeout_s: float = 600.0
    health: HealthPolicy = field(default_factory=HealthPolicy)
    min_failed_devices: int = DEFAULT_MIN_FAILED_DEVICES

    def __post_init__(self) -> None:
        """Validate and normalise the values (numbers become floats, waves a tuple)."""
        waves = tuple(_number(w, "wave") for w in self.waves)
        _check_waves(waves)
        soak = _number(self.soak_s, "soak time")
        if soak < 0.0:
            raise RolloutError(f"bad soak time {self.soak_s!r}: must be >= 0 seconds")
        max_failure = _number(self.max_failure, "max failure")
        if not 0.0 <= max_failure <= 1.0:
            raise RolloutError(f"bad max failure {self.max_failure!r}: must be in [0, 1]")
        if (
            isinstance(self.min_reports, bool)
            or not isinstance(self.min_reports, int)
            or self.min_reports < 1
        ):
            raise RolloutError(f"bad min reports {self.min_reports!r}: must be >= 1")
        if (
            isinstance(self.min_failed_devices, bool)
            or not isinstance(self.min_failed_devices, int)
            or self.min_failed_devices < 1
        ):
            raise RolloutError(f"bad min failed devices {self.min_failed_devices!r}: must be >= 1")
        timeout = _number(self.install_timeout_s, "install timeout")
        if timeout <= 0.0:
            raise RolloutError(f"bad install timeout {self.install_timeout_s!r}: must be > 0")
        object.__setattr__(self, "waves", waves)
        object.__setattr__(self, "soak_s", soak)
        object.__setattr__(self, "max_failure", max_failure)
        object.__setattr__(self, "install_timeout_s", timeout)
        object.__setattr__(self, "rollback_on_halt", bool(self.rollback_on_halt))

    @classmethod
    def parse(
        cls,
        *,
        canary: str = "1",
        waves: str = "100",
        soak: str = "5m",
        max_failure: str = "0%",
        min_reports: int = 1,
        rollback_on_halt: bool = True,
        install_timeout: str = "10m",
        health: HealthPolicy | None = None,
        min_failed_devices: int = DEFAULT_MIN_FAILED_DEVICES,
    ) -> RolloutPolicy:
        """Build a policy from the CLI's strings (forms in the module docstring).

        Args:
            canary: ``"2"`` or ``"5%"``.
            waves: ``"25,50,100"``.
            soak: ``"60s"``, ``"5m"``, ``"1h"``, ``"90"``.
            max_failure: ``"10%"`` or ``"0.1"``.
            min_reports: See :attr:`min_reports`.
            rollback_on_halt: See :attr:`rollback_on_halt`.
            install_timeout: A duration, as ``soak``.
            health: The health policy (default :class:`HealthPolicy`).
            min_failed_devices: See :attr:`min_failed_devices`.

        Returns:
            The policy.

        Raises:
            RolloutError: A string is malformed or a value out of range.
        """
        return cls(
            canary=CanarySize.parse(canary),
            waves=parse_waves(waves),
            soak_s=parse_duration(soak),
            max_failure=parse_fraction(max_failure),
            min_reports=min_reports,
            rollback_on_halt=rollback_on_halt,
            install_timeout_s=parse_duration(install_timeout),
            health=HealthPolicy() if health is None else health,
            min_failed_devices=min_failed_devices,
        )

    def stage_fails(self, failed: int, base: int, size: int) -> bool:
        """Whether ``failed`` devices fail a stage (module docstring, "When a stage fails").

        Args:
            failed: The stage's failed devices.
            base: What the share is taken of: the stage's size (early halt) or
                its devices that reported (after the soak).
            size: The stage's size.
        """
        enough = failed >= min(self.min_failed_devices, size)
        return failed > 0 and enough and failed > self.max_failure * base + _EPS

    def stage_sizes(self, n: int) -> tuple[int, ...]:
        """Cut a target of ``n`` devices into stages (empty stages dropped).

        Args:
            n: Devices in the target.

        Returns:
            The number of devices of each stage, canary first; they add up to
            ``n``. Empty for ``n == 0``.
        """
        canary = self.canary.devices(n)
        if canary == 0:
            return ()
        sizes = [canary]
        covered = canary
        for wave in self.waves:
            upto = min(n, max(covered, _share_of(wave, n)))
            if upto > covered:
                sizes.append(upto - covered)
                covered = upto
        return tuple(sizes)

    def to_json(self) -> dict[str, Any]:
        """Give a JSON-able dict of every field."""
        return {
            "canary": self.canary.to_json(),
            "waves": list(self.waves),
            "soak_s": self.soak_s,
            "max_failure": self.max_failure,
            "min_reports": self.min_reports,
            "rollback_on_halt": self.rollback_on_halt,
            "install_timeout_s": self.install_timeout_s,
            "health": self.health.to_json(),
            "min_failed_devices": self.min_failed_devices,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutPolicy:
        """Rebuild from :meth:`to_json`.

        Args:
            data: The dict.

        Returns:
            The policy.

        A policy saved before ``min_failed_devices`` existed keeps the rule it
        was created with (any failure counts: 1).

        Raises:
            RolloutError: Malformed data or values out of range.
        """
        try:
            return cls(
                canary=CanarySize.from_json(data["canary"]),
                waves=tuple(data["waves"]),
                soak_s=data["soak_s"],
                max_failure=data["max_failure"],
                min_reports=data["min_reports"],
                rollback_on_halt=data["rollback_on_halt"],
                install_timeout_s=data["install_timeout_s"],
                health=HealthPolicy.from_json(data["health"]),
                min_failed_devices=data.get("min_failed_devices", 1),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"bad rollout policy: {exc!r}") from None
