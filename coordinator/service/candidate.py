"""A retrained model's gate: evaluated against the serving model, packaged only if better.

The retraining loop (:mod:`coordinator.service.retraining`) calls
:func:`package_candidate` with the final weights of a run a policy started:

1. The serving model's artifact (the stored one the drift was measured on) is
   written to a temporary file and measured on the policy's held-out data with
   :func:`~coordinator.delivery.baseline.load_baseline` (its signatures checked
   against the service's trusted keys), as ``fedge train --baseline`` does.
2. The candidate is exported and packaged (int8, signed with the service's keys)
   by :func:`~coordinator.delivery.packaging.package_weights`, whose last check
   before signing is :func:`strictly_better`: the deployed-model gate (same
   outputs, no worse) and then *strictly better* on the held-out data. A candidate
   that only matches the serving model is refused too: rolling it out would change
   nothing but the version.

Built-in families only (``softmax``, ``mlp``); a PyTorch run's candidate is refused
with a :class:`~coordinator.errors.PackagingError` naming that limit.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from compress.keys import SigningKey
from compress.lineage import Lineage
from compress.signing import TrustedKeys
from coordinator.delivery.baseline import Baseline, load_baseline
from coordinator.delivery.packaging import (
    LabelledData,
    PackagedModelGate,
    PackageResult,
    package_weights,
)
from coordinator.errors import PackagingError, WorseThanBaselineError
from coordinator.federated.models import HIGHER_IS_BETTER
from edge_agent.runtime.base import ModelRuntime

__all__ = ["package_candidate", "strictly_better"]

logger = logging.getLogger(__name__)


def strictly_better(baseline: Baseline) -> PackagedModelGate:
    """The deployed-model gate, then: the new model must beat the serving one.

    Raises (from the returned function):
        PackagingError: other outputs than the serving model's.
        WorseThanBaselineError: worse than, or only as good as, the serving model.
    """
    no_worse = baseline.gate(tolerance=0.0)

    def check(model: ModelRuntime, value: float) -> None:
        no_worse(model, value)
        if baseline.worse_by(value) >= 0:
            logger.warning("retrained model is not better than %s: %s %.4g",
                           baseline.describe(), baseline.metric, value)  # fmt: skip
            raise WorseThanBaselineError(
                f"the retrained model is not better than the serving one: {baseline.metric} "
                f"{value:.4g}, serving {baseline.describe()}; nothing was signed"
            )

    return check


def package_candidate(
    *,
    family: str,
    weights: Mapping[str, npt.NDArray[np.float32]],
    name: str,
    version: int,
    keys: Sequence[SigningKey],
    holdout: LabelledData,
    serving: bytes,
    trusted: TrustedKeys | None,
    out: Path,
    now: datetime,
    metadata: Mapping[str, str],
    lineage: Lineage | None = None,
) -> tuple[Baseline, PackageResult]:
    """Package ``weights`` as ``name`` v``version`` at ``out`` if they beat ``serving``.

    Returns:
        The serving model's figure and the packaged candidate.

    Raises:
        WorseThanBaselineError: the candidate is not better on ``holdout``.
        PackagingError: a PyTorch candidate, a serving artifact that cannot be read
            or evaluated, or a candidate that cannot be packaged.
        CompressError: the artifact cannot be written or signed.
    """
    if family not in ("softmax", "mlp"):
        raise PackagingError(
            f"retraining packages built-in models only (softmax, mlp), not {family!r}"
        )
    with tempfile.TemporaryDirectory(prefix="fedge-serving-") as tmp:
        path = Path(tmp) / f"{name}.fedge"
        path.write_bytes(serving)
        baseline = load_baseline(
            path, holdout, higher_is_better=HIGHER_IS_BETTER[holdout.task], trusted=trusted
        )
    result = package_weights(
        family, weights, name=name, version=version, keys=keys, out=out,
        evaluation=holdout, metadata=metadata, now=now, gate=strictly_better(baseline),
        lineage=lineage,
    )  # fmt: skip
    return baseline, result
