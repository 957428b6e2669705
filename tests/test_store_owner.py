"""The owner's claim on a state database: one process runs a fleet's database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coordinator.errors import DatabaseInUseError
from coordinator.service.local import open_store
from coordinator.service.store import MEMORY, MIGRATIONS, SCHEMA_VERSION, Database, Store
from coordinator.service.store.owner import OwnerClaim, holder
from tests.fleet_support import wait_for


def test_a_second_owner_in_this_process_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    db = tmp_path / "sub" / "state.db"
    first = open_store(db)
    try:
        with pytest.raises(DatabaseInUseError, match=rf"in use by .*\(pid {os.getpid()}\)"):
            open_store(db)
        with Store.open(db) as reader:  # a reader that does not run the fleet
            assert reader.devices() == []
    finally:
        first.close()
    first.close()  # idempotent
    with open_store(db) as again:
        assert again.devices() == []


def test_a_killed_owner_leaves_no_claim_behind(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from coordinator.service.local import open_store
            store = open_store(Path({str(db)!r}))
            print("claimed", flush=True)
            sys.stdin.read()  # until killed
        """)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(DatabaseInUseError, match=rf"pid {holder.pid}\)") as caught:
            open_store(db)
        assert caught.value.code == "database_in_use"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)

        def reopened() -> Store | None:
            try:
                return open_store(db)
            except DatabaseInUseError:
                return None

        wait_for(reopened, 5.0, what="the claim to die with its process").close()
    finally:
        holder.kill()
        holder.wait(timeout=10)
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()


def test_an_in_memory_store_claims_nothing(tmp_path: Path) -> None:
    with (
        Store.open(MEMORY, artifact_dir=tmp_path, owner=True) as one,
        Store.open(MEMORY, artifact_dir=tmp_path, owner=True) as two,
    ):
        assert one.devices() == two.devices() == []
    assert list(tmp_path.glob("*.owner")) == []


def test_a_reader_does_not_upgrade_the_schema_under_a_running_service(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    Database(db, migrations=MIGRATIONS[:1]).close()  # as an older fedge left it
    claim = OwnerClaim(db)  # that older service, still running
    try:
        assert holder(db) == os.getpid()
        with pytest.raises(DatabaseInUseError, match="needs a schema upgrade"):
            Store.open(db)  # e.g. a newer `fedge coordinator token create`
    finally:
        claim.release()
    assert holder(db) is None
    with Store.open(db) as store:  # nobody runs it: the upgrade goes ahead
        assert store.database.user_version == SCHEMA_VERSION
