"""``fedge model``: export built-in models, package signed artifacts, inspect them.

* ``export`` turns a built-in family's numpy weights (``.npz``) into ONNX or TFLite;
* ``package`` quantizes a model to int8, optionally checks the accuracy cost, signs
  the manifest and writes one ``.fedge`` artifact (:mod:`coordinator.delivery.packaging`);
  its lineage says it was packaged by hand, with ``--parent ARTIFACT`` as its parent;
* ``inspect`` verifies an artifact against trusted public keys and prints its
  manifest; any failure is one line and a non-zero exit;
* ``lineage`` prints a model's chain of parents (:mod:`coordinator.cli.model_lineage`).

The commands are thin: they parse options, call the library, and print.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from compress.artifact import load_artifact, read_artifact_unverified
from compress.errors import ExportError, FamilyError
from compress.families import FAMILIES
from compress.fileio import atomic_write, load_npz
from compress.keys import load_public_key
from compress.manifest import Manifest, TensorSpec
from compress.onnx_export import export_onnx
from compress.quantize import load_calibration
from compress.signing import TrustedKeys
from compress.tflite_export import export_tflite
from coordinator.cli.key_loading import KeyPasswordFileOption, load_signing_keys
from coordinator.cli.model_lineage import lineage
from coordinator.cli.options import JsonOption
from coordinator.cli.output import console, human_bytes, print_json, reported_errors
from coordinator.delivery.lineage import manual_lineage, parent_from_artifact
from coordinator.delivery.packaging import (
    PackageRequest,
    PackageResult,
    load_labelled_npz,
    package_model,
)
from coordinator.errors import PackagingError

app = typer.Typer(help="Export, package, sign and inspect model artifacts.", no_args_is_help=True)

app.command("lineage")(lineage)

MAX_WEIGHTS_FILE_BYTES = 1024 * 1024 * 1024


class ExportFormat(StrEnum):
    """Formats ``fedge model export`` writes."""

    onnx = "onnx"
    tflite = "tflite"


class QuantizeMode(StrEnum):
    """Quantization choices of ``fedge model package``."""

    int8 = "int8"
    none = "none"


def load_weights(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Read a weights ``.npz`` (no pickles).

    Raises:
        FamilyError: missing, oversized, unreadable or not an .npz file.
    """
    return load_npz(path, max_bytes=MAX_WEIGHTS_FILE_BYTES, error=FamilyError,
                    what="weights file")  # fmt: skip


@app.command()
def export(
    family: Annotated[
        str, typer.Option(show_default=False, help=f"Built-in family: {', '.join(FAMILIES)}.")
    ],
    weights: Annotated[
        Path, typer.Option(show_default=False, help=".npz with W0, b0, W1, b1, ... (W: in x out).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", show_default=False, help="Model file to write.")
    ],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="onnx, or tflite (needs fedge[tflite]).")
    ] = ExportFormat.onnx,
) -> None:
    """Export a built-in family's numpy weights to an ONNX (or TFLite) model."""
    with reported_errors():
        layers = load_weights(weights)
        if fmt is ExportFormat.onnx:
            model = export_onnx(family, layers)
        else:
            model = export_tflite(family, layers)
        try:
            atomic_write(out, model)
        except OSError as exc:
            raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    console.print(f"wrote {out} ({fmt.value}, {human_bytes(len(model))})", highlight=False)


def _package_table(result: PackageResult) -> Table:
    table = Table(title=f"{result.manifest.name} v{result.manifest.version}", show_header=True)
    table.add_column("")
    table.add_column("fp32", justify="right")
    table.add_column(result.manifest.quantization, justify="right")
    table.add_row("size", human_bytes(result.fp32_bytes), human_bytes(result.packaged_bytes))
    if result.fp32_accuracy is not None and result.packaged_accuracy is not None:
        table.add_row(
            "accuracy",
            f"{100 * result.fp32_accuracy:.2f}%",
            f"{100 * result.packaged_accuracy:.2f}%",
        )
    return table


def _package_json(result: PackageResult) -> dict[str, Any]:
    return {
        "ok": True,
        "path": str(result.path),
        "manifest": result.manifest.to_dict(),
        "fp32_bytes": result.fp32_bytes,
        "packaged_bytes": result.packaged_bytes,
        "size_ratio": result.size_ratio,
        "fp32_accuracy": result.fp32_accuracy,
        "packaged_accuracy": result.packaged_accuracy,
        "accuracy_drop_points": result.accuracy_drop,
    }


@app.command()
def package(
    model: Annotated[
        Path,
        typer.Argument(
            show_default=False, help="The fp32 model (.onnx; or .tflite with --quantize none)."
        ),
    ],
    name: Annotated[
        str, typer.Option(show_default=False, help="Model name (a-z, 0-9, '.', '_', '-').")
    ],
    version: Annotated[
        int, typer.Option(min=1, show_default=False, help="Version; must grow with every release.")
    ],
    key: Annotated[
        list[Path],
        typer.Option(show_default=False, help="Signing key file; repeat for k-of-n signing."),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", show_default=False, help="Artifact file to write (.fedge)."),
    ],
    quantize: Annotated[QuantizeMode, typer.Option(help="int8 or none.")] = QuantizeMode.int8,
    calibration: Annotated[
        Path | None, typer.Option(help=".npz with 'x': static int8 calibration data.")
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option("--eval", help=".npz with 'x' and 'y': report fp32 and int8 accuracy."),
    ] = None,
    max_accuracy_drop: Annotated[
        float, typer.Option(min=0.0, help="Refuse if int8 loses more points than this.")
    ] = 1.0,
    expires_in_days: Annotated[
        int, typer.Option(min=1, max=36500, help="Days until the manifest expires.")
    ] = 365,
    tag: Annotated[
        list[str] | None, typer.Option(help="Hardware tag a device must have; repeatable.")
    ] = None,
    parent: Annotated[
        Path | None,
        typer.Option(
            help="The artifact this model replaces or was trained from: its lineage parent.",
            dir_okay=False,
        ),
    ] = None,
    key_password_file: KeyPasswordFileOption = None,
    as_json: JsonOption = False,
) -> None:
    """Quantize, sign and package a model into one artifact file."""
    with reported_errors(as_json=as_json):
        parent_ref = None if parent is None else parent_from_artifact(parent)
        request = PackageRequest(
            model_path=model,
            name=name,
            version=version,
            keys=load_signing_keys(key, key_password_file),
            out=out,
            quantize="int8" if quantize is QuantizeMode.int8 else "none",
            calibration=None if calibration is None else load_calibration(calibration),
            evaluation=None if eval_data is None else load_labelled_npz(eval_data),
            max_accuracy_drop=max_accuracy_drop,
            expires_in=timedelta(days=expires_in_days),
            hardware_tags=tuple(tag or ()),
            lineage=manual_lineage(parent_ref),
        )
        if calibration is not None and quantize is QuantizeMode.none:
            raise PackagingError("--calibration only makes sense with --quantize int8")
        with console.status("quantizing, evaluating and signing...", spinner="dots"):
            result = package_model(request, now=datetime.now(UTC))
    if as_json:
        print_json(_package_json(result))
        return
    console.print(_package_table(result))
    console.print(
        f"size ratio {result.size_ratio:.2f}x; wrote {result.path} "
        f"(sha256 {result.manifest.sha256[:16]}...)",
        highlight=False,
    )


def _manifest_table(manifest: Manifest) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")

    def tensors(specs: tuple[TensorSpec, ...]) -> str:
        return ", ".join(
            f"{t.name} {t.dtype}[{', '.join('?' if d is None else str(d) for d in t.shape)}]"
            for t in specs
        )

    rows = [
        ("name", manifest.name),
        ("version", str(manifest.version)),
        ("format", manifest.format),
        ("quantization", manifest.quantization),
        ("size", f"{human_bytes(manifest.length)} ({manifest.length} bytes)"),
        ("sha256", manifest.sha256),
        ("inputs", tensors(manifest.inputs)),
        ("outputs", tensors(manifest.outputs)),
        ("created", manifest.created.isoformat()),
        ("expires", manifest.expires.isoformat()),
        ("hardware tags", ", ".join(manifest.hardware_tags) or "-"),
        ("health check", "yes" if manifest.health_check else "no"),
        ("reference", manifest.reference.summary() if manifest.reference else "no"),
        ("lineage", manifest.lineage.summary() if manifest.lineage else "no"),
    ]
    rows += [(f"metadata.{k}", v) for k, v in sorted(manifest.metadata.items())]
    for label, value in rows:
        table.add_row(label, value)
    return table


@app.command()
def inspect(
    artifact: Annotated[
        Path, typer.Argument(show_default=False, help="The .fedge artifact to inspect.")
    ],
    trust: Annotated[
        list[Path] | None, typer.Option(help="Trusted public key file; repeatable.")
    ] = None,
    threshold: Annotated[int, typer.Option(min=1, help="Signatures required (k of n).")] = 1,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Show the manifest without checking signatures.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Verify an artifact against trusted keys and print its manifest.

    Exits non-zero with a one-line reason when the signature is bad, no trusted key
    signed, the payload's length or hash does not match, the manifest has expired, or
    the file is not an artifact.
    """
    with reported_errors(as_json=as_json):
        if no_verify:
            signed, _ = read_artifact_unverified(artifact)
            manifest, verified = signed.manifest, False
        else:
            if not trust:
                raise PackagingError("give --trust KEY.pub (repeatable), or --no-verify")
            trusted = TrustedKeys.of((load_public_key(p) for p in trust), threshold)
            result = load_artifact(artifact, trusted, now=datetime.now(UTC))
            signed, manifest, verified = result.signed, result.manifest, True
    key_ids = [s.key_id for s in signed.signatures]
    if as_json:
        print_json({"ok": True, "verified": verified, "path": str(artifact),
                    "signed_by": key_ids, "manifest": manifest.to_dict()})  # fmt: skip
        return
    console.print(_manifest_table(manifest))
    console.print(f"signed by   {', '.join(k[:16] for k in key_ids)}", highlight=False)
    if verified:
        console.print(f"[bold green]verified[/] ({threshold} of {len(trust or [])} trusted keys)")
    else:
        console.print("[bold yellow]NOT verified[/] (--no-verify: signatures were not checked)")
