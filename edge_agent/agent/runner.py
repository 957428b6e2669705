"""The ``fedge-agent run`` entry point: one :class:`~edge_agent.agent.device.Agent`
until SIGTERM or SIGINT.

:func:`run_agent` installs handlers for both signals, builds and starts the agent
(an agent that cannot start, for bad keys, an unusable data directory or a bad
endpoint address, is logged and gives exit status 1), waits for a signal, stops the
agent (offline status, disconnect, stores closed) and puts the previous signal
handlers back.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from compress.errors import CompressError
from edge_agent.agent.device import Agent
from edge_agent.config.agent import AgentConfig
from edge_agent.errors import AgentError
from edge_agent.ota.installer import Checkpoint, no_checkpoint

__all__ = ["run_agent"]

logger = logging.getLogger(__name__)


def run_agent(config: AgentConfig, *, checkpoint: Checkpoint = no_checkpoint) -> int:
    """Run an agent until SIGTERM or SIGINT (the ``fedge-agent run`` entry point).

    Returns:
        The process exit status: 0 after a clean stop, 1 when the agent cannot start.
    """
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received signal %d, stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            agent = Agent(config, checkpoint=checkpoint)
            agent.start()
        except (AgentError, CompressError) as exc:
            logger.error("cannot start the agent: %s", exc)
            return 1
        logger.info("agent %s running (data in %s)", config.device_id, Path(config.data_dir))
        stop.wait()
        agent.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
