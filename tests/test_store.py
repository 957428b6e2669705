"""The coordinator's Store: a round trip through every table, on a file and in memory."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.errors import ArtifactCorruptError, ConflictError, NotFoundError, StoreError
from coordinator.service.store import (
    MEMORY,
    PresenceRow,
    RolloutDevice,
    RunState,
    Store,
    TelemetryRow,
)
from coordinator.service.tokens import Role


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "file":
        opened = Store.open(tmp_path / "state.db")
    else:
        opened = Store.open(MEMORY, artifact_dir=tmp_path / "blobs")
    with opened:
        yield opened


def window(
    device_id: str = "pi-1",
    *,
    received_at: float = 100.0,
    start: float = 0.0,
    end: float = 10.0,
    model: str | None = "digits",
    version: int | None = 3,
    predictions: int = 100,
    errors: int = 0,
    p95: float = 5.0,
    seq: int = 1,
) -> TelemetryRow:
    return TelemetryRow(
        device_id=device_id,
        received_at=received_at,
        window_start=start,
        window_end=end,
        model=model,
        version=version,
        predictions=predictions,
        errors=errors,
        p50=1.0,
        p95=p95,
        p99=p95 * 2,
        cpu_percent=12.5,
        memory_bytes=50_000_000,
        seq=seq,
    )


# -- devices and presence ---------------------------------------------------


def test_devices_and_presence(store: Store) -> None:
    status = {"online": True, "agent_version": "0.1.0", "hardware": {"cpu_count": 4}}
    first = store.upsert_device(
        "pi-1", online=True, at=10.0, status=status, tags=["lab", "arm64"], model="m", version=2
    )
    assert first.first_seen == first.last_seen == 10.0
    assert first.online
    assert first.status == status
    assert first.tags == ("lab", "arm64")
    assert (first.model, first.version) == ("m", 2)

    # Same presence: no history row; fields not given are kept.
    again = store.upsert_device("pi-1", online=True, at=20.0)
    assert again.last_seen == 20.0
    assert again.first_seen == 10.0
    assert (again.status, again.tags, again.model, again.version) == (
        status,
        ("lab", "arm64"),
        "m",
        2,
    )
    # The Last Will: offline, model cleared explicitly.
    gone = store.upsert_device("pi-1", online=False, at=30.0, model=None, version=None, tags=[])
    assert not gone.online
    assert (gone.model, gone.version, gone.tags, gone.status) == (None, None, (), status)
    store.upsert_device("pi-1", online=True, at=40.0, status=None)
    store.upsert_device("pi-0", online=False, at=5.0)

    assert [d.device_id for d in store.devices()] == ["pi-0", "pi-1"]
    device = store.device("pi-1")
    assert device is not None
    assert device.status is None
    assert store.device("nope") is None
    assert store.presence_history("pi-1") == [
        PresenceRow("pi-1", True, 40.0),
        PresenceRow("pi-1", False, 30.0),
        PresenceRow("pi-1", True, 10.0),
    ]
    assert store.presence_history("pi-1", limit=1) == [PresenceRow("pi-1", True, 40.0)]
    assert store.presence_history("pi-0") == [PresenceRow("pi-0", False, 5.0)]

    # Retention: old changes go, but each device's latest one stays however old.
    assert store.prune_presence(older_than=35.0) == 2
    assert store.presence_history("pi-1") == [PresenceRow("pi-1", True, 40.0)]
    assert store.presence_history("pi-0") == [PresenceRow("pi-0", False, 5.0)]
    assert store.prune_presence(older_than=1000.0) == 0


def test_json_columns_reject_non_finite(store: Store) -> None:
    with pytest.raises(StoreError, match="JSON"):
        store.upsert_device("pi-1", online=True, at=1.0, status={"x": math.nan})
    with pytest.raises(StoreError, match="JSON"):
        store.upsert_device("pi-1", online=True, at=1.0, status={"x": object()})
    with pytest.raises(StoreError, match="finite"):
        store.upsert_device("pi-1", online=True, at=math.inf)
    assert store.devices() == []


# -- artifacts --------------------------------------------------------------


def put(store: Store, data: bytes = b"model bytes", at: float = 1.0) -> str:
    row = store.put_artifact(
        data, name="digits", version=3, manifest={"name": "digits"}, uploaded_by="cli", at=at
    )
    return row.sha256


def test_artifacts_round_trip_and_idempotent(store: Store) -> None:
    data = b"\x00model\xff" * 1000
    row = store.put_artifact(
        data, name="digits", version=3, manifest={"v": 3}, uploaded_by="tok1", at=5.0
    )
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert (row.name, row.version, row.size, row.manifest) == ("digits", 3, len(data), {"v": 3})
    again = store.put_artifact(
        data, name="other", version=9, manifest={}, uploaded_by="tok2", at=50.0
    )
    assert again == row
    assert store.artifacts() == [row]
    assert store.artifact(row.sha256) == row
    assert store.artifact_bytes(row.sha256) == data
    blob = store.artifact_dir / f"{row.sha256}.fedge"
    assert blob.read_bytes() == data
    assert [p.name for p in store.artifact_dir.iterdir()] == [blob.name]  # no temp files
    other = put(store, b"second", at=6.0)
    assert [a.sha256 for a in store.artifacts()] == [row.sha256, other]


def test_corrupted_or_missing_artifact_is_detected(store: Store) -> None:
    sha = put(store)
    blob = store.artifact_dir / f"{sha}.fedge"
    damaged = bytearray(blob.read_bytes())
    damaged[3] ^= 0x01
    blob.write_bytes(bytes(damaged))
    with pytest.raises(ArtifactCorruptError, match="no longer matches"):
        store.artifact_bytes(sha)
    blob.write_bytes(blob.read_bytes() + b"x")
    with pytest.raises(ArtifactCorruptError):
        store.artifact_bytes(sha)
    blob.unlink()
    with pytest.raises(ArtifactCorruptError, match="cannot read"):
        store.artifact_bytes(sha)
    # Uploading the same bytes again repairs the file.
    put(store)
    assert store.artifact_bytes(sha) == b"model bytes"


def test_unknown_artifact_ids(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.artifact_bytes("0" * 64)
    with pytest.raises(NotFoundError):
        store.artifact_bytes("../../etc/passwd")
    assert store.artifact("../x") is None


# -- rollouts ---------------------------------------------------------------


def test_rollouts(store: Store) -> None:
    sha = put(store)
    created = store.create_rollout(
        "r1",
        artifact_sha256=sha,
        target="tag:lab",
        policy={"stages": [0.1, 1.0]},
        state="created",
        snapshot={"engine": 1},
        created_by="cli",
        at=10.0,
    )
    assert created.created_at == created.updated_at == 10.0
    assert store.rollout("r1") == created
    assert store.rollout_devices("r1") == []
    with pytest.raises(ConflictError):
        store.create_rollout(
            "r1",
            artifact_sha256=sha,
            target="all",
            policy={},
            state="x",
            snapshot={},
            created_by="cli",
            at=11.0,
        )
    with pytest.raises(NotFoundError):
        store.create_rollout(
            "r2",
            artifact_sha256="f" * 64,
            target="all",
            policy={},
            state="x",
            snapshot={},
            created_by="cli",
            at=11.0,
        )

    devices = [
        RolloutDevice("c", 1, "pending", 20.0),
        RolloutDevice("a", 0, "installed", 20.0, {"version": 3}),
        RolloutDevice("b", 0, "failed", 20.0, {"error_code": "bad_shape"}),
    ]
    store.save_rollout("r1", state="stage-1", snapshot={"engine": 2}, devices=devices, at=20.0)
    saved = store.rollout("r1")
    assert saved is not None
    assert (saved.state, saved.snapshot, saved.updated_at) == ("stage-1", {"engine": 2}, 20.0)
    assert [d.device_id for d in store.rollout_devices("r1")] == ["a", "b", "c"]
    assert store.rollout_devices("r1")[1].detail == {"error_code": "bad_shape"}

    # Devices left out of the next save disappear.
    store.save_rollout(
        "r1",
        state="stage-2",
        snapshot={"engine": 3},
        at=30.0,
        devices=[RolloutDevice("a", 0, "installed", 30.0)],
    )
    assert store.rollout_devices("r1") == [RolloutDevice("a", 0, "installed", 30.0)]

    # A failing save (a device listed twice) changes nothing at all.
    twice = [RolloutDevice("x", 0, "pending", 40.0), RolloutDevice("x", 0, "pending", 40.0)]
    with pytest.raises(StoreError, match="UNIQUE"):
        store.save_rollout("r1", state="broken", snapshot={"engine": 4}, devices=twice, at=40.0)
    after = store.rollout("r1")
    assert after is not None
    assert (after.state, after.snapshot) == ("stage-2", {"engine": 3})
    assert store.rollout_devices("r1") == [RolloutDevice("a", 0, "installed", 30.0)]
    with pytest.raises(NotFoundError):
        store.save_rollout("nope", state="x", snapshot={}, devices=[], at=1.0)


def test_rollouts_by_state(store: Store) -> None:
    sha = put(store)
    for number, state in enumerate(["running", "done", "paused", "done"]):
        store.create_rollout(
            f"r{number}",
            artifact_sha256=sha,
            target="all",
            policy={},
            state=state,
            snapshot={},
            created_by="cli",
            at=float(number),
        )
    assert [r.rollout_id for r in store.rollouts()] == ["r0", "r1", "r2", "r3"]
    assert [r.rollout_id for r in store.rollouts(states={"running", "paused"})] == ["r0", "r2"]
    assert store.rollouts(states=[]) == []
    assert store.rollout("nope") is None


# -- runs and rounds --------------------------------------------------------


def test_runs_and_rounds(store: Store) -> None:
    run = store.create_run("run-1", config={"rounds": 3}, created_by="cli", at=1.0)
    assert run.state is RunState.RUNNING
    with pytest.raises(ConflictError):
        store.create_run("run-1", config={}, created_by="cli", at=1.0)
    store.record_round("run-1", 1, status="running", metrics={}, started_at=2.0)
    store.record_round(
        "run-1",
        1,
        status="ok",
        metrics={"accuracy": 0.9, "loss": None},
        started_at=2.0,
        finished_at=3.0,
    )
    store.record_round(
        "run-1",
        2,
        status="failed",
        reason="too few clients",
        metrics={},
        started_at=4.0,
        finished_at=5.0,
    )
    rounds = store.rounds("run-1")
    assert [(r.round, r.status, r.reason) for r in rounds] == [
        (1, "ok", ""),
        (2, "failed", "too few clients"),
    ]
    assert rounds[0].metrics == {"accuracy": 0.9, "loss": None}
    assert rounds[0].finished_at == 3.0
    with pytest.raises(StoreError, match="JSON"):
        store.record_round("run-1", 3, status="ok", metrics={"loss": math.nan}, started_at=6.0)
    with pytest.raises(NotFoundError):
        store.record_round("nope", 1, status="ok", metrics={}, started_at=1.0)
    middle = store.run("run-1")
    assert middle is not None
    assert middle.updated_at == 5.0

    finished = store.finish_run("run-1", state=RunState.FAILED, at=6.0)
    assert (finished.state, finished.updated_at) == (RunState.FAILED, 6.0)
    with pytest.raises(ValueError, match="running"):
        store.finish_run("run-1", state=RunState.RUNNING, at=7.0)
    stopped = store.finish_run("run-1", state=RunState.INTERRUPTED, at=7.0)
    assert stopped.state is RunState.INTERRUPTED
    with pytest.raises(NotFoundError):
        store.finish_run("nope", at=7.0)
    assert store.run("nope") is None
    assert store.rounds("nope") == []


def test_mark_interrupted_runs(store: Store) -> None:
    for run_id in ("b", "a", "c"):
        store.create_run(run_id, config={}, created_by="cli", at=1.0)
    store.finish_run("c", at=2.0)
    assert store.mark_interrupted_runs(at=10.0) == ["a", "b"]
    states = {r.run_id: (r.state, r.updated_at) for r in store.runs()}
    assert states == {
        "a": (RunState.INTERRUPTED, 10.0),
        "b": (RunState.INTERRUPTED, 10.0),
        "c": (RunState.FINISHED, 2.0),
    }
    assert store.mark_interrupted_runs(at=11.0) == []


# -- telemetry --------------------------------------------------------------


def test_telemetry_round_trip_and_queries(store: Store) -> None:
    rows = [window(start=s, end=s + 10, seq=s) for s in (0, 10, 20)] + [window("pi-2")]
    store.add_telemetry(rows)
    store.add_telemetry([])
    assert store.telemetry_count() == 4
    latest = store.telemetry("pi-1")
    assert [r.window_end for r in latest] == [30.0, 20.0, 10.0]
    assert latest[0].row_id is not None
    assert latest[-1] == replace(rows[0], row_id=latest[-1].row_id)
    assert [r.window_end for r in store.telemetry("pi-1", limit=1)] == [30.0]
    assert [r.window_end for r in store.telemetry("pi-1", since=20.0)] == [30.0, 20.0]
    assert store.telemetry("nope") == []


def test_bad_telemetry_batch_is_refused_whole(store: Store) -> None:
    with pytest.raises(StoreError, match="pi-2"):
        store.add_telemetry([window(), window("pi-2", p95=math.nan)])
    assert store.telemetry_count() == 0
    # Only a window stored already is skipped; a row the schema refuses is an error.
    broken = dataclasses.replace(window(seq=7), device_id=None)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="NOT NULL"):
        store.add_telemetry([window(), broken])
    assert store.telemetry_count() == 0
    assert store.add_telemetry([window(), window()]) == 1


def test_prune_by_rows_and_age(store: Store) -> None:
    store.add_telemetry([window(received_at=float(t), seq=t) for t in range(10)])
    assert store.prune_telemetry(max_rows=20) == 0
    assert store.prune_telemetry(max_rows=7) == 3
    assert sorted(r.seq for r in store.telemetry("pi-1")) == list(range(3, 10))
    assert store.prune_telemetry(older_than=5.0) == 2
    assert sorted(r.seq for r in store.telemetry("pi-1")) == list(range(5, 10))
    assert store.prune_telemetry(older_than=8.0, max_rows=1) == 4
    assert [r.seq for r in store.telemetry("pi-1")] == [9]
    assert store.prune_telemetry() == 0
    assert store.prune_telemetry(max_rows=0) == 1
    assert store.telemetry_count() == 0
    with pytest.raises(ValueError, match="max_rows"):
        store.prune_telemetry(max_rows=-1)


def test_baselines_are_the_newest_windows_of_the_version_served_before(store: Store) -> None:
    store.add_telemetry(
        [
            window("pi-1", start=0, end=10, version=1, p95=99.0, seq=1),  # an older version
            window("pi-1", start=10, end=20, version=2, p95=4.0, seq=2),
            window("pi-1", start=20, end=30, version=2, errors=5, p95=60.0, seq=3),
            window("pi-1", start=30, end=40, version=2, p95=6.0, seq=4),
            window("pi-1", start=40, end=50, version=3, p95=80.0, seq=5),  # the new version
            window("pi-2", start=0, end=10, version=1, p95=7.0, seq=1),
            window("pi-2", start=10, end=20, version=2, predictions=1, p95=1.0, seq=2),  # few
            window("pi-2", start=20, end=30, version=1, predictions=0, errors=10, p95=0.0),
            window("pi-3", received_at=10.0, version=2, seq=1),  # too old
            window("pi-4", model="other", version=2, seq=1),
            window("pi-5", model=None, version=None, seq=1),
        ]
    )

    def seqs(found: dict[str, list[TelemetryRow]]) -> dict[str, list[int]]:
        return {device: [r.seq for r in rows] for device, rows in found.items()}

    found = store.baselines("digits", other_than=3, min_calls=10, since=50.0)
    assert seqs(found) == {"pi-1": [2, 3, 4], "pi-2": [1, 1]}  # oldest first
    assert [r.window_end for r in found["pi-2"]] == [10.0, 30.0]
    newest = store.baselines("digits", other_than=3, min_calls=10, since=50.0, windows=2)
    assert seqs(newest) == {"pi-1": [3, 4], "pi-2": [1, 1]}
    one = store.baselines("digits", other_than=3, min_calls=1, since=50.0, windows=2,
                          device_ids=["pi-2"])  # fmt: skip
    assert {d: [r.version for r in rows] for d, rows in one.items()} == {"pi-2": [1]}
    old = store.baselines("digits", other_than=3, min_calls=10, since=0.0, device_ids=["pi-3"])
    assert old.keys() == {"pi-3"}
    assert store.baselines("digits", other_than=3, min_calls=10, since=0.0, device_ids=[]) == {}
    many = [f"x{i:04d}" for i in range(1200)] + ["pi-1", "pi-2"]  # more than one IN list
    assert seqs(store.baselines("digits", other_than=3, min_calls=10, since=50.0,
                                device_ids=many)) == seqs(found)  # fmt: skip
    assert [r.version for r in store.baselines("digits", other_than=2, min_calls=1,
                                               since=50.0)["pi-1"]] == [3]  # fmt: skip
    with pytest.raises(ValueError, match="windows"):
        store.baselines("digits", other_than=3, min_calls=1, since=0.0, windows=0)


def test_concurrent_writers(tmp_path: Path) -> None:
    threads_n, batches, per_batch = 8, 200, 3
    errors: list[BaseException] = []
    with Store.open(tmp_path / "state.db") as store:

        def work(worker: int) -> None:
            try:
                for batch in range(batches):
                    store.add_telemetry(
                        [
                            window(f"pi-{worker}", seq=batch, received_at=float(batch), start=i)
                            for i in range(per_batch)
                        ]
                    )
                    store.upsert_device(f"pi-{worker}", online=batch % 2 == 0, at=float(batch))
                    if batch % 50 == 0:
                        store.telemetry(f"pi-{worker}", limit=5)
                        store.audit("cli", Role.OPERATOR, "test.write", f"pi-{worker}", at=1.0)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        assert errors == []
        assert store.telemetry_count() == threads_n * batches * per_batch
        assert len(store.devices()) == threads_n
        assert len(store.presence_history("pi-3", limit=1000)) == batches
        assert len(store.audit_log(limit=1000)) == threads_n * 4
    with Store.open(tmp_path / "state.db") as reopened:
        assert reopened.telemetry_count() == threads_n * batches * per_batch


# -- audit ------------------------------------------------------------------


def test_audit_log(store: Store) -> None:
    entries = [
        store.audit("tok1", Role.OPERATOR, "rollout.create", "r1", detail={"n": i}, at=float(i))
        for i in range(5)
    ]
    cli = store.audit("cli", Role.OPERATOR, "token.add", at=9.0)
    assert (cli.target, cli.detail) == ("", {})
    assert store.audit_log() == [*entries, cli]
    assert store.audit_log(limit=2) == [entries[4], cli]
    assert store.audit_log(limit=2, since_id=entries[1].audit_id) == entries[2:4]
    assert store.audit_log(since_id=cli.audit_id) == []
    assert entries[3].detail == {"n": 3}
    assert entries[3].role is Role.OPERATOR
    with pytest.raises(ValueError, match="limit"):
        store.audit_log(limit=-1)


@pytest.mark.parametrize(
    "query",
    [
        lambda store: store.presence_history("d1", limit=-1),
        lambda store: store.telemetry("d1", limit=-1),
        lambda store: store.audit_log(limit=-1),
        lambda store: store.audit_log(limit=-1, since_id=0),
    ],
)
def test_a_negative_limit_is_refused(store: Store, query: Callable[[Store], object]) -> None:
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        query(store)
