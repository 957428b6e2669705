"""Test-only entry point: ``fedge-agent`` that SIGKILLs itself at an install checkpoint.

    python -m tests.agent_crash POINT run --device-id ... (the usual ``run`` options)

``POINT`` is a checkpoint name (``chunk-N`` for the N-th chunk held,
``payload-verified``, ``slot-written``, ``model-loaded``, ``health-checked``,
``committed``): the agent dies exactly there, as on a power cut, and must come back
serving a complete, verified model. The production console script has no such hook;
the crash tests (tests/test_delivery_mqtt.py, through tests/fleet_support.py's
``AgentProcess(crash_at=...)``) start the agent through this file instead.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence

from edge_agent.cli import main
from edge_agent.ota.installer import Checkpoint

logger = logging.getLogger("tests.agent_crash")


def crash_checkpoint(point: str) -> Checkpoint:
    """A checkpoint hook that SIGKILLs this process on reaching ``point``."""
    logger.warning("crash point %s: this agent will kill itself there", point)

    def checkpoint(name: str) -> None:
        if name == point:
            logger.warning("crash point %s reached: SIGKILL", name)
            os.kill(os.getpid(), signal.SIGKILL)

    return checkpoint


def run(argv: Sequence[str]) -> int:
    """``POINT`` then the ``fedge-agent`` arguments; returns the exit status."""
    point, *rest = argv
    return main(rest, checkpoint=crash_checkpoint(point))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
