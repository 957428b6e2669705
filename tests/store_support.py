"""State databases as an older fedge left them, for the store's migration tests.

:func:`old_database_with_audit` creates a database at an older schema version (only
the first ``version`` migrations applied) holding one audit row, so that a test can
open it with today's :class:`~coordinator.service.store.Store` and check that the
migration added its tables and kept the rows.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from coordinator.service.store import MIGRATIONS, Database


def old_database_with_audit(path: Path, version: int) -> None:
    """Create ``path`` at schema ``version`` with one audit row."""
    Database(path, migrations=MIGRATIONS[:version]).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO audit (at, actor, role, action, target, detail_json) "
                 "VALUES (1, 'x', 'operator', 'a', 't', '{}')")  # fmt: skip
    conn.commit()
    conn.close()
