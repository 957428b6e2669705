"""The start-up check of the installed models: serve only what still verifies.

At start-up (:meth:`~edge_agent.ota.updates.Updater.restore`) the committed state
names the model to serve and the previous one as a fallback. :func:`restore_installed`:

1. re-verifies the current model against the signed manifest kept in its slot
   (:mod:`edge_agent.ota.reverify`: signatures and threshold of the trusted keys,
   the payload's length and sha256), loads and serves it; if that fails, the
   previous one the same way. The one not served is re-verified without loading;
2. reports each model that fails as a ``failed`` ``install_status`` under the
   deployment id :data:`STARTUP_CHECK`, logged as an error, and lists it as a
   :class:`~edge_agent.ota.reverify.ModelProblem` for ``/v1/health``. An expired
   model is still served, and reported there as ``installed`` with the code
   ``expired``;
3. commits the state without the models refused as untrusted (so a deploy of the
   genuine model is not taken for "already installed"); a model that failed for
   another reason (the runtime cannot load it) is only dropped once another one
   serves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace as dc_replace

from compress.errors import CompressError, ExpiredError
from compress.manifest import format_time
from edge_agent.errors import AgentError, UntrustedModelError
from edge_agent.ota.model_store import InstalledModel, ModelStore
from edge_agent.ota.reporter import Reporter
from edge_agent.ota.reverify import ModelProblem, VerifiedModel
from edge_agent.protocol import InstallState

__all__ = ["STARTUP_CHECK", "restore_installed"]

logger = logging.getLogger(__name__)

STARTUP_CHECK = "startup-check"
"""The deployment id of the ``install_status`` events of the start-up check."""


def restore_installed(
    store: ModelStore,
    *,
    activate: Callable[[InstalledModel], VerifiedModel],
    verify: Callable[[InstalledModel], object],
    reporter: Reporter,
) -> list[ModelProblem]:
    """Serve the first installed model that re-verifies (current, then previous).

    Args:
        store: The device's model store (its state is committed here when it changes).
        activate: Re-verifies, loads and serves a model (raises when it cannot).
        verify: Re-verifies a model without loading it (raises when it fails).
        reporter: Where the start-up check's ``install_status`` events go.

    Returns:
        What is wrong with the installed models, for ``/v1/health``.

    Raises:
        StateError: the state cannot be committed.
    """
    state = store.state
    problems: list[ModelProblem] = []
    served: InstalledModel | None = None
    refused: list[InstalledModel] = []
    for candidate in (state.current, state.previous):
        if candidate is None:
            continue
        try:
            if served is None:
                verified = activate(candidate)
                if verified.expired:
                    problems.append(_report_expired(reporter, verified))
                served = candidate
            else:
                verify(candidate)
        except UntrustedModelError as exc:
            refused.append(candidate)
            problems.append(_startup_problem(reporter, candidate, exc))
        except (AgentError, CompressError) as exc:
            problems.append(_startup_problem(reporter, candidate, exc))
    kept = [m for m in (state.current, state.previous) if m is not None and m not in refused]
    if served is not None and served is not state.current:
        logger.warning("serving the previous model %s v%d instead", served.name, served.version)
        kept = [served]
    elif served is None and (refused or kept):
        logger.error("no installed model passed the start-up check: serving none")
    elif served is None:
        logger.info("no model installed yet")
    restored = dc_replace(
        state,
        current=kept[0] if kept else None,
        previous=kept[1] if len(kept) > 1 else None,
    )
    if restored != state:
        store.commit(restored)
    return problems


def _startup_problem(
    reporter: Reporter, model: InstalledModel, exc: AgentError | CompressError
) -> ModelProblem:
    """Log and report a model the start-up check does not serve."""
    logger.error("cannot serve %s v%d from slot %s: %s", model.name, model.version, model.slot, exc)
    reporter.report(STARTUP_CHECK, InstallState.FAILED, model, code=exc.code, reason=str(exc))
    return ModelProblem.of(model, exc.code, str(exc), served=False)


def _report_expired(reporter: Reporter, verified: VerifiedModel) -> ModelProblem:
    """Report that the model served from start-up has an expired manifest."""
    model = verified.model
    reason = (
        f"serving {model.name} v{model.version}, whose manifest expired at "
        f"{format_time(verified.manifest.expires)}"
    )
    reporter.report(
        STARTUP_CHECK, InstallState.INSTALLED, model, code=ExpiredError.code, reason=reason
    )
    return ModelProblem.of(model, ExpiredError.code, reason, served=True)
