"""Error-feedback residuals of top-k codecs, kept across rounds and restarts.

A top-k codec sends only the largest entries of ``update + residual`` and keeps the
rest as the next residual (:func:`compress.codecs.encode_update`). Losing it on a
restart would silently drop everything the device has not sent yet, so
:class:`ResidualStore` keeps one ``.npz`` per model under the agent's data
directory, written atomically (temp file, fsync, rename): after a crash the file
holds either the previous or the new residual, never a mix.

A residual whose layout (names, shapes) no longer matches the model's weights (the
model changed) is discarded, as is an unreadable file (logged).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.codecs import Layout, layout_of
from compress.errors import CompressError
from compress.fileio import atomic_write, load_npz
from edge_agent.errors import StateError

__all__ = ["ResidualStore"]

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_RESIDUAL_BYTES = 1 << 30


class ResidualStore:
    """Per-model residuals in a directory (one thread at a time)."""

    def __init__(self, directory: Path) -> None:
        """Use ``directory`` (created on the first save)."""
        self._dir = directory

    def _path(self, model: str) -> Path:
        if not _NAME_RE.fullmatch(model):
            raise StateError(f"invalid model name {model!r}")
        return self._dir / f"residual-{model}.npz"

    def load(self, model: str, layout: Layout) -> dict[str, npt.NDArray[np.float32]] | None:
        """The stored residual of ``model`` if it fits ``layout``, else None."""
        path = self._path(model)
        if not path.exists():
            return None
        try:
            arrays = load_npz(
                path, max_bytes=MAX_RESIDUAL_BYTES, error=StateError, what="residual file"
            )
        except StateError as exc:
            logger.warning("residual of %s unreadable, starting afresh: %s", model, exc)
            return None
        residual = {name: np.asarray(value, dtype=np.float32) for name, value in arrays.items()}
        try:
            fits = layout_of(residual) == layout
        except CompressError:
            fits = False
        if not fits:
            logger.info("residual of %s does not fit the model's weights: discarded", model)
            return None
        return residual

    def save(self, model: str, residual: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Replace the stored residual of ``model`` atomically.

        Raises:
            StateError: it cannot be written.
        """
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {name: np.asarray(value) for name, value in residual.items()}
        np.savez(buffer, **arrays)
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self._path(model), buffer.getvalue(), mode=0o600)
        except OSError as exc:
            raise StateError(f"cannot save the residual of {model}: {exc}") from exc

    def clear(self, model: str) -> None:
        """Forget the residual of ``model``."""
        self._path(model).unlink(missing_ok=True)
