"""How the updater speaks to the coordinator: the :class:`Reporter` protocol.

The :class:`~edge_agent.ota.updates.Updater` (and the start-up check,
:mod:`edge_agent.ota.startup_check`) never publish themselves. They call a
:class:`Reporter`, which the agent (:class:`~edge_agent.agent.device.Agent`)
implements: ``install_status`` events (kept for later when they cannot go out), chunk
requests for a transfer, and the retained status published again when the installed
model changed.
"""

from __future__ import annotations

from typing import Protocol

from compress.manifest import Manifest
from edge_agent.ota.model_store import InstalledModel
from edge_agent.protocol import ChunkRequest, InstallState

__all__ = ["Reporter"]


class Reporter(Protocol):
    """How the updater speaks to the coordinator (the agent implements it)."""

    def report(
        self,
        deployment_id: str,
        state: InstallState,
        model: InstalledModel | Manifest | None,
        *,
        code: str | None = None,
        reason: str | None = None,
        held: int = 0,
        total: int = 0,
    ) -> None:
        """Send an ``install_status`` (kept for later when it cannot go out now)."""
        ...

    def request_chunks(self, request: ChunkRequest) -> bool:
        """Send a chunk request; True if it went out."""
        ...

    def announce(self) -> None:
        """Publish the retained status again (the installed model changed)."""
        ...
