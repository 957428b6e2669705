"""What ``fedge train`` does with the final weights: ``--package`` and ``--baseline``.

Everything here is prepared before the first round, so that a bad option, key or
baseline fails at once rather than after the training:

1. :func:`signing_keys_for` loads the ``--key`` signing keys (an encrypted key's
   password from ``--key-password-file`` or asked for);
2. :func:`baseline_gate` reads ``--baseline`` (the deployed artifact, its signatures
   checked against ``--baseline-trust`` keys when given) and measures it on
   ``--eval-data`` (:mod:`coordinator.delivery.baseline`); the resulting
   :class:`BaselineGate` refuses a ``--version`` devices would take for a rollback.

After the rounds, :func:`package_run` packages the global weights: a built-in family
through :func:`~coordinator.delivery.packaging.package_weights`, a PyTorch model
through :func:`package_torch_run` (ONNX export, int8 calibrated on the evaluation
examples, int8 gated against fp32), the new model gated against the baseline, the
lineage in the manifest, signed; it gives the summary line for the output.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from compress.keys import SigningKey, load_public_key
from compress.lineage import Lineage
from compress.signing import TrustedKeys
from coordinator.cli.key_loading import load_signing_keys
from coordinator.cli.output import human_bytes
from coordinator.delivery.baseline import Baseline, load_baseline
from coordinator.delivery.packaging import (
    LabelledData,
    PackagedModelGate,
    PackageResult,
    package_weights,
)
from coordinator.errors import RunError
from coordinator.federated.models import HIGHER_IS_BETTER, ModelDef, torch_module
from coordinator.federated.runs import RunResult

__all__ = [
    "CALIBRATION_ROWS",
    "NEEDS_EVAL_DATA",
    "BaselineGate",
    "baseline_gate",
    "package_run",
    "package_torch_run",
    "signing_keys_for",
]

logger = logging.getLogger(__name__)

NEEDS_EVAL_DATA = (
    "--package of a PyTorch model needs --eval-data: its examples calibrate the int8 model "
    "and the int8 model is checked against fp32 on them"
)
CALIBRATION_ROWS = 256
"""Evaluation examples a PyTorch model's int8 quantization is calibrated on."""


@dataclass(frozen=True)
class BaselineGate:
    """``--baseline`` and how it gates ``--package``."""

    baseline: Baseline
    tolerance: float = 0.0
    allow_worse: bool = False

    def gate(self) -> PackagedModelGate:
        """The check run on the new int8 model before it is signed."""
        return self.baseline.gate(tolerance=self.tolerance, allow_worse=self.allow_worse)

    def check_version(self, name: str, version: int) -> None:
        """Refuse, before any round runs, a version devices would refuse as a rollback.

        Raises:
            RunError: ``name`` is the deployed model's and ``version`` not above it.
        """
        deployed = self.baseline.manifest
        if name == deployed.name and version <= deployed.version:
            message = (
                f"--version {version} is not above the deployed {deployed.name} "
                f"v{deployed.version} (--baseline): devices would refuse it as a rollback; "
                f"give --version {deployed.version + 1}"
            )
            logger.error("%s", message)
            raise RunError(message)


def baseline_gate(
    baseline: Path | None,
    *,
    package: Path | None,
    evaluation: LabelledData | None,
    trust: list[Path],
    threshold: int,
    tolerance: float,
    allow_worse: bool,
) -> BaselineGate | None:
    """Read and measure ``--baseline`` (before any round runs), or None without it.

    Raises:
        RunError: a gate option without ``--baseline``, or ``--baseline`` without
            ``--package`` or ``--eval-data``.
        PackagingError: the baseline cannot be read, verified or evaluated, or is a
            model of another task or input shape.
        CompressError: a ``--baseline-trust`` key cannot be read.
    """
    if baseline is None:
        if allow_worse or trust or tolerance:
            raise RunError(
                "--allow-worse, --baseline-tolerance and --baseline-trust are about --baseline: "
                "give --baseline"
            )
        return None
    if package is None:
        raise RunError("--baseline gates --package: give --package and --key too")
    if evaluation is None:
        raise RunError("--baseline compares both models on --eval-data: give --eval-data")
    trusted = TrustedKeys.of((load_public_key(p) for p in trust), threshold) if trust else None
    loaded = load_baseline(
        baseline, evaluation, higher_is_better=HIGHER_IS_BETTER[evaluation.task], trusted=trusted
    )
    return BaselineGate(loaded, tolerance=tolerance, allow_worse=allow_worse)


def signing_keys_for(
    package: Path | None, keys: list[Path], password_file: Path | None
) -> list[SigningKey]:
    """The --package signing keys, loaded (passwords asked) before any round runs."""
    if package is None:
        return []
    if not keys:
        raise RunError("--package needs at least one --key")
    return load_signing_keys(keys, password_file)


def package_run(
    result: RunResult,
    *,
    model_def: ModelDef,
    model: str,
    out: Path,
    signing_keys: list[SigningKey],
    version: int,
    eval_data: LabelledData | None,
    baseline: BaselineGate | None,
    lineage: Lineage,
) -> str:
    metadata = {"trained": "federated", "rounds": str(len(result.rounds)),
                "task": model_def.task}  # fmt: skip
    gate = None if baseline is None else baseline.gate()
    if baseline is None:
        logger.info("packaging %s v%d without comparing it to the deployed model "
                    "(no --baseline)", model, version)  # fmt: skip
    if model_def.is_torch:
        packaged = package_torch_run(
            result,
            model_def,
            model=model,
            out=out,
            keys=signing_keys,
            version=version,
            eval_data=eval_data,
            metadata=metadata,
            gate=gate,
            lineage=lineage,
        )
    else:
        packaged = package_weights(
            model_def.family,
            result.weights,
            name=model,
            version=version,
            keys=signing_keys,
            out=out,
            evaluation=eval_data,
            metadata=metadata,
            now=datetime.now(UTC),
            gate=gate,
            lineage=lineage,
        )
    return (
        f"wrote {out}: {model} v{version}, {packaged.manifest.quantization}, "
        f"{human_bytes(packaged.packaged_bytes)}; {_compared(packaged, baseline)}"
    )


def _compared(packaged: PackageResult, gate: BaselineGate | None) -> str:
    """What the new model was compared with, for the summary."""
    if gate is None:
        return "no deployed baseline compared (--baseline)"
    base = gate.baseline
    value = math.nan if packaged.packaged_metric is None else packaged.packaged_metric
    new = f"{base.metric} {value:.4g}"
    worse = base.worse_by(value) > 0
    verb = "worse than (--allow-worse)" if worse else "no worse than"
    checked = "" if base.verified else ", signatures not checked"
    return f"{new}, {verb} the deployed {base.describe()}{checked}"


def package_torch_run(
    result: RunResult,
    model_def: ModelDef,
    *,
    model: str,
    out: Path,
    keys: list[SigningKey],
    version: int,
    eval_data: LabelledData | None,
    metadata: dict[str, str],
    gate: PackagedModelGate | None,
    lineage: Lineage,
) -> PackageResult:
    """Build the factory's module with the final weights and package it (int8, gated, signed).

    Raises:
        RunError: no evaluation data (it calibrates and gates the int8 model).
        TrainingError: the module cannot be built or the weights do not fit it.
        PackagingError: export, quantization or a gate (int8 against fp32, the new
            model against the deployed one) failed.
    """
    if eval_data is None:
        raise RunError(NEEDS_EVAL_DATA)
    from coordinator.delivery.torch_packaging import (  # noqa: PLC0415
        package_torch,
    )

    module = torch_module(model_def, result.weights)
    calibration = eval_data.x
    if model_def.task == "reconstruction":
        calibration = eval_data.x[np.asarray(eval_data.y) == 0]  # what normal looks like
    packaged: PackageResult = package_torch(
        module,
        task=model_def.task,
        sample_shape=model_def.input_shape,
        name=model,
        version=version,
        keys=keys,
        out=out,
        calibration=calibration[:CALIBRATION_ROWS],
        evaluation=eval_data,
        now=datetime.now(UTC),
        metadata={**metadata, "model_spec": model_def.spec, "task": model_def.task},
        gate=gate,
        lineage=lineage,
    )
    return packaged
