"""Lineage inputs the packaging paths share: the code version and parent references.

Every artifact the coordinator packages carries a :class:`compress.lineage.Lineage`
record in its manifest. This module gives the pieces every packaging path needs:

* :func:`code_version`: the fedge version (``coordinator.__version__``) and the git
  commit of the source tree the coordinator runs from (``git rev-parse HEAD`` in the
  package's directory, once per process; None when fedge is not run from a git
  checkout or git is missing -- logged once at debug level);
* :func:`parent_of`: a manifest's :class:`~compress.lineage.ParentRef` (name,
  version, payload sha256), and :func:`parent_from_artifact` the same for an
  artifact file (``--parent``, ``--baseline``), read without trusting it: the
  parent is a record of where a model came from, not a trust decision;
* :func:`manual_lineage`: the record of a model an operator packaged by hand
  (``fedge model package``);
* :func:`lineage_chain`: the chain of a model name, newest to oldest: the highest
  version of NAME among the manifests given, then its parent (matched by name,
  version *and* payload sha256), its parent's parent, ... until a model without a
  parent, a parent that is not among them (``missing``), or a link seen before
  (``cycle``: a loop of hostile or mistaken records is cut, not followed).
  ``fedge model lineage`` gives it the service's stored artifacts, or the ``.fedge``
  files of a directory (:func:`artifacts_in`); a stored manifest that does not
  parse is skipped with a warning (:func:`stored_link`), as is an unreadable file;
* :func:`replaced_by`: what a rollout of a model replaces, for ``fedge rollout
  status`` and the API's rollout view: the model's lineage parent, and what the
  targeted devices that do not run it yet serve (model, version, how many devices).

Runs build theirs with :func:`coordinator.federated.lineage.lineage_for_run` (that
layer knows :class:`~coordinator.federated.reports.RunResult`).
"""

from __future__ import annotations

import functools
import logging
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.artifact import read_artifact_unverified
from compress.errors import CompressError, ManifestError
from compress.lineage import COMMIT_RE, CodeVersion, Lineage, ParentRef, Trigger
from compress.manifest import Manifest
from coordinator import __version__
from coordinator.errors import NotFoundError, PackagingError

__all__ = [
    "ChainLink",
    "LineageChain",
    "artifacts_in",
    "code_version",
    "lineage_chain",
    "manual_lineage",
    "parent_from_artifact",
    "parent_of",
    "replaced_by",
    "stored_link",
]

logger = logging.getLogger(__name__)

#: Seconds ``git rev-parse`` may take before the commit is recorded as unknown.
GIT_TIMEOUT_S = 5.0
#: The most ``.fedge`` files :func:`artifacts_in` reads from one directory.
MAX_DIR_ARTIFACTS = 10_000


@functools.cache
def code_version() -> CodeVersion:
    """The fedge version and the git commit of the running source tree, if any."""
    return CodeVersion(fedge=__version__, commit=_git_commit(Path(__file__).resolve().parent))


def _git_commit(where: Path) -> str | None:
    try:
        done = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            ["git", "-C", str(where), "rev-parse", "HEAD"],  # noqa: S607 - git on PATH
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("no git commit for lineage: %s", exc)
        return None
    commit = done.stdout.strip()
    if done.returncode != 0 or not COMMIT_RE.fullmatch(commit):
        logger.debug("no git commit for lineage: %s", done.stderr.strip()[:200])
        return None
    return commit


def parent_of(manifest: Manifest) -> ParentRef:
    """The reference a child model records to its parent ``manifest``."""
    return ParentRef(name=manifest.name, version=manifest.version, sha256=manifest.sha256)


def parent_from_artifact(path: Path) -> ParentRef:
    """The parent reference of an artifact file (its signatures are not checked).

    Raises:
        PackagingError: the file is not a readable fedge artifact.
    """
    try:
        signed, _ = read_artifact_unverified(path)
    except CompressError as exc:
        logger.error("parent artifact %s: %s", path, exc)
        raise PackagingError(f"parent artifact {path}: {exc}") from exc
    return parent_of(signed.manifest)


def manual_lineage(parent: ParentRef | None) -> Lineage:
    """The lineage of a model packaged by hand: trigger ``manual``, no run."""
    return Lineage(trigger=Trigger.manual(), code=code_version(), parent=parent)


@dataclass(frozen=True)
class ChainLink:
    """One model of a chain and where it was found (a file, or a stored artifact's id)."""

    manifest: Manifest
    source: str


@dataclass(frozen=True)
class LineageChain:
    """A model's chain, newest first.

    Attributes:
        links: The newest model of the name, then each parent found.
        missing: The oldest link's parent when it was not among the models given.
        cycle: True when the oldest link's parent is a link already in the chain.
    """

    links: tuple[ChainLink, ...]
    missing: ParentRef | None = None
    cycle: bool = False


def lineage_chain(name: str, found: Iterable[ChainLink]) -> LineageChain:
    """The chain of model ``name`` among ``found``, newest to oldest.

    Raises:
        NotFoundError: no model named ``name`` among them.
    """
    by_ref: dict[ParentRef, ChainLink] = {}
    for link in found:
        by_ref.setdefault(parent_of(link.manifest), link)
    named = [link for ref, link in by_ref.items() if ref.name == name]
    if not named:
        message = f"no artifact of model {name!r} ({len(by_ref)} artifacts looked at)"
        logger.error("lineage: %s", message)
        raise NotFoundError(message)
    link = max(named, key=lambda candidate: candidate.manifest.version)
    links = [link]
    seen = {parent_of(link.manifest)}
    while link.manifest.lineage is not None and link.manifest.lineage.parent is not None:
        parent = link.manifest.lineage.parent
        if parent in seen:
            logger.warning("lineage of %s: %s is its own ancestor; chain cut", name,
                           parent.describe())  # fmt: skip
            return LineageChain(tuple(links), cycle=True)
        following = by_ref.get(parent)
        if following is None:
            return LineageChain(tuple(links), missing=parent)
        seen.add(parent)
        links.append(following)
        link = following
    return LineageChain(tuple(links))


def artifacts_in(directory: Path) -> list[ChainLink]:
    """The manifests of the ``.fedge`` files in ``directory`` (signatures not checked).

    A file that is not a readable artifact is skipped with a warning.

    Raises:
        NotFoundError: ``directory`` is not a directory.
        PackagingError: more than :data:`MAX_DIR_ARTIFACTS` files.
    """
    if not directory.is_dir():
        logger.error("lineage: %s is not a directory", directory)
        raise NotFoundError(f"{directory} is not a directory")
    files = sorted(directory.glob("*.fedge"))
    if len(files) > MAX_DIR_ARTIFACTS:
        logger.error("lineage: %d artifacts in %s", len(files), directory)
        raise PackagingError(f"{len(files)} artifacts in {directory}; at most {MAX_DIR_ARTIFACTS}")
    links = []
    for path in files:
        try:
            signed, _ = read_artifact_unverified(path)
        except CompressError as exc:
            logger.warning("lineage: skipping %s: %s", path, exc)
            continue
        links.append(ChainLink(signed.manifest, str(path)))
    return links


def stored_link(manifest: Mapping[str, Any], source: str) -> ChainLink | None:
    """A stored artifact's manifest (its JSON form) as a link, or None (logged) if it
    does not parse."""
    try:
        return ChainLink(Manifest.from_dict(manifest), source)
    except ManifestError as exc:
        logger.warning("lineage: skipping stored artifact %s: %s", source, exc)
        return None


def replaced_by(
    manifest: Manifest, serving: Iterable[tuple[str | None, int | None]]
) -> dict[str, Any]:
    """What a rollout of ``manifest`` replaces, as JSON.

    ``serving`` is the (model, version) each targeted device reports now. Returns
    ``{"parent": {name, version, sha256} | None, "serving": [{"model", "version",
    "devices"}, ...]}``: the lineage parent, and what the devices not on
    ``manifest``'s version serve, most devices first (``model`` None: nothing).
    """
    parent = None if manifest.lineage is None else manifest.lineage.parent
    mine = (manifest.name, manifest.version)
    counts = Counter(pair for pair in serving if pair != mine)
    return {
        "parent": None if parent is None else parent.to_dict(),
        "serving": [
            {"model": model, "version": version, "devices": n}
            for (model, version), n in sorted(
                counts.items(), key=lambda item: (-item[1], str(item[0][0]), item[0][1] or 0)
            )
        ],
    }
