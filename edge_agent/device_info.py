"""Hardware facts for the agent's retained status message.

At connect time the agent puts :func:`hardware_facts` into
:class:`~edge_agent.protocol.Status` ``hardware``, so an operator sees at a glance
what each device is (``fedge`` fleet status) and rollouts can target device kinds.

Every fact is optional: one that cannot be determined on this platform, or whose
lookup fails in any way, is left out, and the function never raises. String values
are cleaned so the status message always encodes: control, format and surrogate
characters (category ``C``, NUL included) are removed, surrounding whitespace is
stripped, values are cut to :data:`MAX_VALUE_CHARS` characters, and empty strings
are left out. Integer facts must lie in ``[0, 2**53 - 1]`` (JSON-safe) or are left
out.
"""

from __future__ import annotations

import logging
import os
import platform
import unicodedata
from collections.abc import Callable
from pathlib import Path

from edge_agent.protocol.limits import MAX_SAFE_INT

__all__ = ["DEVICE_TREE_MODEL", "MAX_VALUE_CHARS", "clean_text", "hardware_facts"]

logger = logging.getLogger(__name__)

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
"""Where Linux exposes the board model (Raspberry Pi and other device-tree boards)."""

MAX_VALUE_CHARS = 4096
"""Most characters of a string fact (the protocol's ``max_string_chars``)."""


def clean_text(value: str) -> str:
    """Remove category-``C`` characters, strip whitespace, cut to the length limit."""
    kept = "".join(ch for ch in value if not unicodedata.category(ch).startswith("C"))
    return kept.strip()[:MAX_VALUE_CHARS].strip()


def _memory_bytes() -> int | None:
    """Total physical memory, where ``sysconf`` knows it."""
    pages = os.sysconf("SC_PHYS_PAGES")
    page_size = os.sysconf("SC_PAGE_SIZE")
    return pages * page_size if pages > 0 and page_size > 0 else None


def _board_model(path: Path) -> str | None:
    """The device-tree board model (``Raspberry Pi 4 Model B Rev 1.4``), if any."""
    if not path.exists():
        return None
    with path.open("rb") as stream:
        raw = stream.read(MAX_VALUE_CHARS * 4)
    return raw.replace(b"\x00", b"").decode("utf-8", errors="replace")


def hardware_facts(*, device_tree_model: Path = DEVICE_TREE_MODEL) -> dict[str, str | int | float]:
    """Describe this device for :class:`~edge_agent.protocol.Status` ``hardware``.

    Keys, each present only when known: ``machine`` (``platform.machine()``, e.g.
    ``aarch64``), ``system`` (``Linux``), ``release`` (kernel release), ``python``
    (``3.11.2``), ``cpu_count``, ``memory_bytes`` (total RAM), ``model`` (board
    model from the device tree, e.g. on a Raspberry Pi).

    Args:
        device_tree_model: The file holding the board model (for tests).

    Returns:
        The facts; never raises.
    """
    lookups: dict[str, Callable[[], str | int | float | None]] = {
        "machine": platform.machine,
        "system": platform.system,
        "release": platform.release,
        "python": platform.python_version,
        "cpu_count": os.cpu_count,
        "memory_bytes": _memory_bytes,
        "model": lambda: _board_model(device_tree_model),
    }
    facts: dict[str, str | int | float] = {}
    for key, lookup in lookups.items():
        try:
            value = lookup()
        except Exception as exc:  # noqa: BLE001 - a fact is optional and must not stop the agent
            logger.debug("hardware fact %s unavailable: %s", key, exc)
            continue
        if isinstance(value, str):
            value = clean_text(value)
            if value:
                facts[key] = value
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SAFE_INT:
            facts[key] = value
    return facts
