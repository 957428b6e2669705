"""Checking a device's update before anything is aggregated (pure).

A train task's answer is an :class:`~edge_agent.protocol.UpdateReport` whose single
array ``update`` holds the codec payload (see :mod:`compress.codecs`) of
``new - global`` weights. Before an update reaches a Flower strategy,
:func:`check_update`:

1. checks the report against the task it answers: same codec, a sane example count
   (1 .. :data:`MAX_EXAMPLES`), exactly one ``uint8`` array named ``update``;
2. refuses a payload larger than the codec can produce for this model
   (:func:`compress.codecs.max_payload_bytes`) before decoding it;
3. decodes it against the global weights' layout (names, shapes: a wrong shape or
   a truncated, padded or tampered payload fails here);
4. refuses non-finite values and an update whose L2 norm exceeds ``max_norm``.

:func:`checked_update` returns the decoded update with its norm (the grid screens
a round's norms together: :mod:`coordinator.federated.round_screen`, which rejects
``norm_outlier`` updates); :func:`check_update` returns the update alone.

Every refusal is an :class:`~coordinator.errors.UpdateRejectedError` whose ``reason``
is one of :data:`REJECT_REASONS`; the round counts them by reason and the update is
never aggregated. The sender's identity is established before this (the broker
ACL lets a device publish only under its own id, and the round only accepts a
report from the device its task was sent to).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from compress.codecs import CodecSpec, Layout, decode_update, max_payload_bytes
from compress.errors import CodecError, NonFiniteUpdateError
from coordinator.errors import UpdateRejectedError
from edge_agent.protocol import UpdateReport

__all__ = [
    "DEFAULT_MAX_UPDATE_NORM",
    "MAX_EXAMPLES",
    "REJECT_REASONS",
    "UPDATE_ARRAY",
    "CheckedUpdate",
    "UpdateCheck",
    "check_update",
    "checked_update",
]

UPDATE_ARRAY = "update"
"""Name of the one array of an update report (the codec payload, uint8)."""
MAX_EXAMPLES = 10**9
"""Largest example count a report may claim (it weighs the average)."""
DEFAULT_MAX_UPDATE_NORM = 1e4
"""Default bound on an update's L2 norm (new - global weights)."""
REJECT_REASONS = (
    "wrong_codec",
    "bad_examples",
    "malformed",
    "oversized",
    "wrong_shape",
    "non_finite",
    "too_large",
    "norm_outlier",
)


@dataclass(frozen=True)
class UpdateCheck:
    """What an update is checked against: its task's codec and weights.

    Attributes:
        codec: The codec the task asked for.
        layout: Names and shapes of the global weights, in the task's order.
        max_norm: Largest accepted L2 norm of the decoded update.
    """

    codec: CodecSpec
    layout: Layout
    max_norm: float = DEFAULT_MAX_UPDATE_NORM


@dataclass(frozen=True)
class CheckedUpdate:
    """An update that passed :func:`checked_update`.

    Attributes:
        delta: The update (``new - global``) by weight name, float32, finite.
        norm: Its L2 norm.
    """

    delta: dict[str, npt.NDArray[np.float32]]
    norm: float


def check_update(
    report: UpdateReport,
    arrays: Mapping[str, npt.NDArray[np.generic]],
    check: UpdateCheck,
) -> dict[str, npt.NDArray[np.float32]]:
    """Validate and decode an update: :func:`checked_update`'s ``delta``.

    Raises:
        UpdateRejectedError: the update must not be aggregated; ``reason`` says why.
    """
    return checked_update(report, arrays, check).delta


def checked_update(
    report: UpdateReport,
    arrays: Mapping[str, npt.NDArray[np.generic]],
    check: UpdateCheck,
) -> CheckedUpdate:
    """Validate and decode an update (see the module docstring).

    Args:
        report: The decoded report.
        arrays: Its arrays (inline, or decoded from its upload).
        check: The task's codec and layout.

    Returns:
        The update (``new - global``) by weight name, float32, finite, and its norm.

    Raises:
        UpdateRejectedError: the update must not be aggregated; ``reason`` says why.
    """
    if report.codec != str(check.codec):
        raise UpdateRejectedError(
            "wrong_codec", f"codec {report.codec!r}, task asked for {check.codec}"
        )
    if not 1 <= report.num_examples <= MAX_EXAMPLES:
        raise UpdateRejectedError("bad_examples", f"num_examples {report.num_examples}")
    if set(arrays) != {UPDATE_ARRAY}:
        raise UpdateRejectedError(
            "malformed", f"expected one array {UPDATE_ARRAY!r}, got {sorted(arrays)[:4]}"
        )
    blob = arrays[UPDATE_ARRAY]
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise UpdateRejectedError(
            "malformed", f"update must be 1-D uint8, got {blob.dtype} {blob.shape}"
        )
    limit = max_payload_bytes(check.codec, check.layout)
    if blob.size > limit:
        raise UpdateRejectedError("oversized", f"{blob.size} bytes, at most {limit} for this model")
    try:
        delta = decode_update(blob.tobytes(), check.codec, check.layout)
    except NonFiniteUpdateError as exc:
        raise UpdateRejectedError("non_finite", str(exc)) from exc
    except CodecError as exc:
        raise UpdateRejectedError("malformed", str(exc)) from exc
    for name, shape in check.layout:
        if delta.get(name) is None or delta[name].shape != shape:
            raise UpdateRejectedError("wrong_shape", f"{name} does not have shape {shape}")
    squares = 0.0
    for value in delta.values():
        if not np.all(np.isfinite(value)):
            raise UpdateRejectedError("non_finite", "the update holds NaN or infinite values")
        squares += float(np.dot(value.ravel().astype(np.float64), value.ravel().astype(np.float64)))
    norm = squares**0.5
    if not norm <= check.max_norm:
        raise UpdateRejectedError(
            "too_large", f"update norm {norm:.3g} exceeds {check.max_norm:.3g}"
        )
    return CheckedUpdate(delta, norm)
