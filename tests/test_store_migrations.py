"""The store's database layer: pragmas, migrations, transactions, crash safety."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coordinator.errors import MigrationError, SchemaVersionError, StoreError
from coordinator.service.local import open_store
from coordinator.service.store import (
    MEMORY,
    MIGRATIONS,
    SCHEMA_VERSION,
    Database,
    Migration,
    RolloutDevice,
    Store,
)
from coordinator.service.tokens import hash_token, token_id

COUNTER = Migration(
    SCHEMA_VERSION + 1,
    "count applications",
    (
        "CREATE TABLE applied (n INTEGER)",
        "INSERT INTO applied (n) VALUES (1)",
    ),
)


def raw_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_fresh_database_is_migrated_with_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    db = Database(path, migrations=MIGRATIONS)
    try:
        assert db.user_version == SCHEMA_VERSION == 6
        assert db.journal_mode == "wal"
        with db.read() as conn:
            assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()
    assert {"devices", "presence", "artifacts", "rollouts", "rollout_devices", "runs"} <= tables
    assert {"rounds", "telemetry", "audit", "tokens", "telemetry_device_end"} <= tables
    assert "telemetry_window" in tables
    assert {"drift_scores", "drift_subject"} <= tables
    assert {"registry", "enrollment_tokens"} <= tables
    assert {"retraining_policies", "retraining_runs"} <= tables
    assert raw_version(path) == 6


def test_synchronous_full_and_memory(tmp_path: Path) -> None:
    db = Database(MEMORY, migrations=MIGRATIONS, synchronous="FULL", busy_timeout_s=0.25)
    with db.read() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 250
    assert db.journal_mode == "memory"
    db.close()
    with pytest.raises(ValueError, match="artifact_dir"):
        Store.open(MEMORY)


def test_migrations_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    steps = (*MIGRATIONS, COUNTER)
    for _ in range(3):
        db = Database(path, migrations=steps)
        with db.read() as conn:
            assert conn.execute("SELECT COUNT(*) FROM applied").fetchone()[0] == 1
        assert db.user_version == SCHEMA_VERSION + 1
        db.close()


def test_reopen_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store.open(path) as store:
        store.upsert_device("pi-1", online=True, at=1.0)
    with Store.open(path) as store:
        assert [d.device_id for d in store.devices()] == ["pi-1"]
        assert store.database.user_version == SCHEMA_VERSION


def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(SchemaVersionError, match="version 7 is newer") as info:
        Store.open(path)
    assert (info.value.found, info.value.known) == (7, SCHEMA_VERSION)
    assert info.value.code == "schema_too_new"
    assert raw_version(path) == 7


def test_failing_step_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    next_version = SCHEMA_VERSION + 1
    broken = Migration(next_version, "broken", ("CREATE TABLE half (x INTEGER)", "NOT SQL"))
    with pytest.raises(MigrationError, match=f"version {next_version} \\(broken\\)"):
        Database(path, migrations=(*MIGRATIONS, broken))
    assert raw_version(path) == SCHEMA_VERSION
    conn = sqlite3.connect(path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "half" not in names
    assert "devices" in names
    # Fixed code migrates the same file.
    db = Database(path, migrations=(*MIGRATIONS, COUNTER))
    assert db.user_version == next_version
    db.close()


def test_version_1_telemetry_keeps_one_copy_of_each_window(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Database(path, migrations=MIGRATIONS[:1]).close()
    conn = sqlite3.connect(path)
    for row_id, seq, model in [(1, 1, "m"), (2, 1, "m"), (3, 2, "m"), (4, 1, None), (5, 1, None)]:
        conn.execute(
            "INSERT INTO telemetry VALUES (?, 'pi-1', 1, 0, 10, ?, 1, 5, 0, 1, 2, 3, 4, 5, ?)",
            (row_id, model, seq),
        )
    conn.commit()
    conn.close()
    with Store.open(path) as store:
        assert store.database.user_version == SCHEMA_VERSION
        assert sorted(r.row_id or 0 for r in store.telemetry("pi-1")) == [1, 3, 4]


def test_version_2_tokens_stay_valid_and_never_expire(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Database(path, migrations=MIGRATIONS[:2]).close()
    conn = sqlite3.connect(path)
    plaintext = "fedge_a-token-made-before-tokens-could-expire"
    conn.execute(
        "INSERT INTO tokens (token_id, name, role, hash, created_at) VALUES (?, ?, ?, ?, ?)",
        (token_id(hash_token(plaintext)), "old", "operator", hash_token(plaintext), 1.0),
    )
    conn.commit()
    conn.close()
    with Store.open(path) as store:
        assert store.database.user_version == SCHEMA_VERSION
        [row] = store.tokens()
        assert row.expires_at is None
        assert not row.expired(1e12)
        found = store.authenticate(plaintext, at=1e12)
        assert found is not None
        assert found.name == "old"


def test_misnumbered_migrations_are_a_bug(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="numbered 2"):
        Database(MEMORY, migrations=(Migration(2, "skip", ()),))


class BoomError(Exception):
    pass


def insert_runs(db: Database, *runs: tuple[str, str], fail: bool = False) -> None:
    """Insert (run_id, state) rows in one transaction, then raise BoomError if ``fail``."""
    with db.transaction() as conn:
        for run_id, state in runs:
            conn.execute("INSERT INTO runs VALUES (?, '{}', ?, 'cli', 1, 1)", (run_id, state))
        if fail:
            raise BoomError


def run_ids(db: Database) -> list[str]:
    with db.read() as conn:
        assert not conn.in_transaction
        return [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY run_id")]


def test_transaction_rollback_leaves_nothing(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.db", migrations=MIGRATIONS)
    with pytest.raises(BoomError):
        insert_runs(db, ("r1", "running"), ("r2", "running"), fail=True)
    assert run_ids(db) == []

    # A failing nested block undoes only its own writes.
    with db.transaction():
        insert_runs(db, ("outer", "running"))
        with pytest.raises(BoomError):
            insert_runs(db, ("inner", "running"), fail=True)
    assert run_ids(db) == ["outer"]

    # SQLite errors become StoreError, after a rollback.
    with pytest.raises(StoreError, match="CHECK constraint"):
        insert_runs(db, ("r3", "running"), ("r4", "bogus"))
    assert run_ids(db) == ["outer"]
    db.close()
    db.close()
    with pytest.raises(StoreError):
        _ = db.user_version


def test_second_writer_waits_then_gives_up_at_begin(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE takes the write lock up front: another process waits, then fails."""
    path = tmp_path / "state.db"
    service = Database(path, migrations=MIGRATIONS)
    cli = Database(path, migrations=MIGRATIONS, busy_timeout_s=0.1)
    try:
        with service.transaction() as conn:
            conn.execute("INSERT INTO runs VALUES ('r1', '{}', 'running', 'cli', 1, 1)")
            with pytest.raises(StoreError, match=r"cannot begin.*locked"), cli.transaction():
                pass
            # Readers are not blocked by the writer (WAL), and see the last commit.
            with cli.read() as other:
                assert other.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
        with cli.transaction() as conn:
            conn.execute("INSERT INTO runs VALUES ('r2', '{}', 'running', 'cli', 1, 1)")
        with service.read() as conn:
            assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
    finally:
        cli.close()
        service.close()


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store.open(path)


CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from coordinator.service.store import RolloutDevice, Store

    store = Store.open(Path(sys.argv[1]))
    art = store.put_artifact(b"model", name="m", version=1, manifest={}, uploaded_by="cli", at=1.0)
    store.create_rollout("r1", artifact_sha256=art.sha256, target="all", policy={},
                         state="created", snapshot={}, created_by="cli", at=1.0)
    store.save_rollout("r1", state="stage-1", snapshot={"step": 1}, at=2.0,
                       devices=[RolloutDevice("a", 0, "installed", 2.0),
                                RolloutDevice("b", 0, "pending", 2.0)])
    # Die in the middle of the next save: the transaction is open, never committed.
    with store.database.transaction() as conn:
        conn.execute("DELETE FROM rollout_devices")
        conn.execute("UPDATE rollouts SET state = 'half-written'")
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_keeps_last_save_and_drops_open_transaction(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    result = subprocess.run(
        [sys.executable, "-c", CRASHER, str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == -9, result.stderr.decode()
    with Store.open(path) as store:
        rollout = store.rollout("r1")
        assert rollout is not None
        assert rollout.state == "stage-1"
        assert rollout.snapshot == {"step": 1}
        assert store.rollout_devices("r1") == [
            RolloutDevice("a", 0, "installed", 2.0),
            RolloutDevice("b", 0, "pending", 2.0),
        ]
        assert store.artifact_bytes(rollout.artifact_sha256) == b"model"


def test_the_service_fsyncs_every_commit(tmp_path: Path) -> None:
    with open_store(tmp_path / "state.db") as store:
        with store.database.read() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store.artifact_dir == tmp_path / "artifacts"
