"""Lineage end to end: packaging fills it, ``fedge model lineage`` prints the chain.

Three models packaged with ``fedge model package`` (parent -> child -> grandchild,
each ``--parent`` the previous artifact) form a chain that ``fedge model lineage``
prints newest to oldest from a directory of ``.fedge`` files and from a real
coordinator service's stored artifacts over its HTTP API (uploaded with ``fedge
artifacts upload``). ``lineage_for_run`` records a run's figures; a chain with a
missing parent or a loop ends with it said; an unknown name is a one-line error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from compress.artifact import read_artifact_unverified
from compress.families import init_weights
from compress.keys import generate_signing_key, load_public_key, load_signing_key, save_keypair
from compress.lineage import CodeVersion, DataWindow, Lineage, ParentRef, Trigger
from compress.onnx_export import export_onnx
from compress.signing import TrustedKeys
from coordinator import __version__
from coordinator.cli.app import app
from coordinator.delivery.lineage import ChainLink, lineage_chain, parent_of, stored_link
from coordinator.delivery.packaging import package_weights
from coordinator.errors import NotFoundError
from coordinator.federated.lineage import lineage_for_run
from coordinator.federated.reports import RoundReport, RunResult
from coordinator.link.memory import MemoryHub
from coordinator.service.api import create_app
from coordinator.service.fleet_service import FleetService
from coordinator.service.store import MEMORY, Store
from coordinator.service.tokens import Role
from tests.api_support import serve
from tests.conftest import NOW, make_manifest

runner = CliRunner()


def fedge(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A model file, a key pair, and a directory with v1 <- v2 <- v3 of model ``toy``."""
    root = tmp_path_factory.mktemp("lineage")
    key, pub = save_keypair(generate_signing_key(), root / "keys")
    model = root / "model.onnx"
    model.write_bytes(export_onnx("mlp", init_weights("mlp", [8, 16, 3], np.random.default_rng(0))))
    chain = root / "chain"
    chain.mkdir()
    parent: list[str | Path] = []
    for version in (1, 2, 3):
        out = chain / f"toy-{version}.fedge"
        code, text = fedge("model", "package", model, "--name", "toy", "--version", str(version),
                           "--key", key, "--out", out, "--quantize", "none", "--json",
                           *parent)  # fmt: skip
        assert code == 0, text
        parent = ["--parent", out]
    return model, key, pub, chain


def manifest_of(path: Path) -> Any:
    return read_artifact_unverified(path)[0].manifest


def test_model_package_records_manual_lineage_and_its_parent(
    family: tuple[Path, Path, Path, Path],
) -> None:
    _, _, pub, chain = family
    first, second = manifest_of(chain / "toy-1.fedge"), manifest_of(chain / "toy-2.fedge")
    assert first.lineage is not None
    assert first.lineage.parent is None
    assert first.lineage.trigger == Trigger.manual()
    assert first.lineage.code.fedge == __version__
    assert first.lineage.run_id is None
    assert second.lineage.parent == parent_of(first)
    code, text = fedge("model", "inspect", chain / "toy-2.fedge", "--trust", pub)
    assert code == 0, text
    assert "lineage" in text
    assert "trigger manual, parent toy v1" in " ".join(text.split())


def test_chain_from_a_directory(family: tuple[Path, Path, Path, Path]) -> None:
    _, _, _, chain = family
    code, text = fedge("model", "lineage", "toy", "--dir", chain, "--json")
    assert code == 0, text
    body = json.loads(text)
    assert [link["version"] for link in body["chain"]] == [3, 2, 1]
    assert body["chain"][0]["lineage"]["parent"]["version"] == 2
    assert body["chain"][1]["lineage"]["parent"]["sha256"] == body["chain"][2]["sha256"]
    assert body["missing_parent"] is None
    assert body["cycle"] is False
    code, text = fedge("model", "lineage", "toy", "--dir", chain)
    assert code == 0, text
    flat = " ".join(text.split())
    assert "toy v3" in flat
    assert "toy v1" in flat
    assert "3 models; toy v1 has no parent" in flat


def test_a_junk_file_is_skipped_and_an_unknown_name_is_one_line(
    family: tuple[Path, Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, _, chain = family
    (tmp_path / "junk.fedge").write_bytes(b"not an artifact")
    (tmp_path / "toy-3.fedge").write_bytes((chain / "toy-3.fedge").read_bytes())
    with caplog.at_level(logging.WARNING, "coordinator.delivery.lineage"):
        code, text = fedge("model", "lineage", "toy", "--dir", tmp_path, "--json")
    assert code == 0, text
    assert "skipping" in caplog.text
    body = json.loads(text)
    assert [link["version"] for link in body["chain"]] == [3]
    assert body["missing_parent"]["version"] == 2
    code, text = fedge("model", "lineage", "ghost", "--dir", chain)
    assert code == 1
    assert "no artifact of model 'ghost'" in text
    code, text = fedge("model", "lineage", "toy")
    assert code == 2
    assert "--dir DIR, or --api URL" in text


@pytest.fixture
def service(family: tuple[Path, Path, Path, Path]) -> Iterator[tuple[str, str]]:
    """A coordinator service trusting the family's key, served on 127.0.0.1: (url, token)."""
    _, _, pub, _ = family
    with Store.open(MEMORY, artifact_dir=family[3].parent / "store") as store:
        fleet = FleetService(store, MemoryHub(), TrustedKeys.of([load_public_key(pub)]))
        _row, token = store.add_token("ops", Role.OPERATOR, time.time())
        app_ = create_app(fleet, authenticate=fleet.authenticate)
        with serve(app_) as url:
            yield url, token


def test_chain_through_the_service_api(
    family: tuple[Path, Path, Path, Path], service: tuple[str, str]
) -> None:
    _, _, _, chain = family
    url, token = service
    api = ("--api", url, "--token", token)
    for version in (2, 3):  # the grandparent is not uploaded yet
        code, text = fedge("artifacts", "upload", chain / f"toy-{version}.fedge", *api)
        assert code == 0, text
    code, text = fedge("model", "lineage", "toy", *api, "--json")
    assert code == 0, text
    body = json.loads(text)
    assert [link["version"] for link in body["chain"]] == [3, 2]
    assert body["missing_parent"]["version"] == 1
    code, text = fedge("artifacts", "upload", chain / "toy-1.fedge", *api)
    assert code == 0, text
    code, text = fedge("model", "lineage", "toy", *api, "--json")
    body = json.loads(text)
    assert [link["version"] for link in body["chain"]] == [3, 2, 1]
    assert body["missing_parent"] is None
    stored = {link["source"] for link in body["chain"]}
    assert len(stored) == 3  # the stored artifacts' ids
    assert all(len(sha) == 64 for sha in stored)
    code, text = fedge("model", "lineage", "toy", *api)
    assert code == 0, text
    assert "3 models; toy v1 has no parent" in " ".join(text.split())


def test_lineage_for_run_records_the_run(tmp_path: Path) -> None:
    result = RunResult(
        rounds=[
            RoundReport(round=1, clients=3),
            RoundReport(round=2, clients=5),
            RoundReport(round=3, status="failed", clients=9),
        ],
        weights=init_weights("softmax", [4, 3], np.random.default_rng(1)),
    )
    parent = parent_of(make_manifest())
    trigger = Trigger.by_policy("drift-guard", drift=0.42, reason="fleet PSI 0.42 > 0.2")
    record = lineage_for_run(result, trigger=trigger, parent=parent, strategy="fedprox",
                             codec="int8", run_id="run-abc123",
                             window=DataWindow(10, 20))  # fmt: skip
    assert (record.rounds, record.participants) == (2, 5)  # failed rounds do not count
    assert (record.strategy, record.codec, record.run_id) == ("fedprox", "int8", "run-abc123")
    assert record.trigger == trigger
    assert record.parent == parent
    assert record.code.fedge == __version__
    key = load_signing_key(save_keypair(generate_signing_key(), tmp_path / "k")[0])
    packaged = package_weights("softmax", result.weights, name="child", version=2, keys=[key],
                               out=tmp_path / "c.fedge", now=NOW, lineage=record)  # fmt: skip
    assert manifest_of(tmp_path / "c.fedge").lineage == record
    assert packaged.manifest.lineage == record


def _link(version: int, parent: ParentRef | None) -> ChainLink:
    lineage = Lineage(trigger=Trigger.manual(), code=CodeVersion(fedge="0.1.0"), parent=parent)
    manifest = make_manifest(bytes([version]) * 8, name="m", version=version, lineage=lineage)
    return ChainLink(manifest, f"file-{version}")


def test_a_loop_of_parents_is_cut_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    one = _link(1, None)
    two = _link(2, parent_of(one.manifest))
    # a hostile v1 that names v2 as its parent: same name, version and payload as v1
    looped_one = _link(1, parent_of(two.manifest))
    with caplog.at_level(logging.WARNING, "coordinator.delivery.lineage"):
        chain = lineage_chain("m", [two, looped_one])
    assert [link.manifest.version for link in chain.links] == [2, 1]
    assert chain.cycle
    assert "its own ancestor" in caplog.text
    assert not lineage_chain("m", [two, one]).cycle
    with pytest.raises(NotFoundError, match="no artifact of model 'x'"):
        lineage_chain("x", [two, one])


def test_a_stored_manifest_that_does_not_parse_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    good = make_manifest()
    with caplog.at_level(logging.WARNING, "coordinator.delivery.lineage"):
        assert stored_link({"name": "digits", "format": "onnx"}, "a" * 64) is None
    assert "skipping stored artifact" in caplog.text
    link = stored_link(good.to_dict(), "b" * 64)
    assert link is not None
    assert link.manifest == good


def test_a_parent_that_is_not_an_artifact_is_refused_in_one_line(
    family: tuple[Path, Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, key, _, _ = family
    junk = tmp_path / "junk.fedge"
    junk.write_bytes(b"FEDGE but not really")
    out = tmp_path / "child.fedge"
    with caplog.at_level(logging.ERROR, "coordinator.delivery.lineage"):
        code, text = fedge("model", "package", model, "--name", "toy", "--version", "9",
                           "--key", key, "--out", out, "--quantize", "none",
                           "--parent", junk)  # fmt: skip
    assert code == 1
    assert f"parent artifact {junk}" in " ".join(text.split())
    assert "parent artifact" in caplog.text
    assert not out.exists()
