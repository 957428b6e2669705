"""The schema of the coordinator's database, as numbered migration steps.

Append a step to change the schema; never edit a released one (databases in the
field have run it already). :class:`~coordinator.service.store.database.Database` applies
the missing steps in order, each in its own transaction.

Conventions: timestamps are REAL unix seconds; ``*_json`` columns hold compact,
sorted-key JSON; booleans are 0/1 with a CHECK. Artifact bytes are files next to
the database, not BLOBs. Telemetry has no foreign key to ``devices`` (a batch may
arrive before the device's status, and the insert is the hot path).
"""

from __future__ import annotations

from coordinator.service.store.database import Migration

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

_V1 = (
    """
    CREATE TABLE devices (
        device_id   TEXT PRIMARY KEY,
        first_seen  REAL NOT NULL,
        last_seen   REAL NOT NULL,
        online      INTEGER NOT NULL CHECK (online IN (0, 1)),
        status_json TEXT,
        tags_json   TEXT NOT NULL DEFAULT '[]',
        model       TEXT,
        version     INTEGER
    )
    """,
    """
    CREATE TABLE presence (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
        online    INTEGER NOT NULL CHECK (online IN (0, 1)),
        at        REAL NOT NULL
    )
    """,
    "CREATE INDEX presence_device_at ON presence (device_id, at)",
    """
    CREATE TABLE artifacts (
        sha256        TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        version       INTEGER NOT NULL,
        size          INTEGER NOT NULL,
        manifest_json TEXT NOT NULL,
        uploaded_by   TEXT NOT NULL,
        uploaded_at   REAL NOT NULL
    )
    """,
    """
    CREATE TABLE rollouts (
        id              TEXT PRIMARY KEY,
        artifact_sha256 TEXT NOT NULL REFERENCES artifacts (sha256),
        target          TEXT NOT NULL,
        policy_json     TEXT NOT NULL,
        state           TEXT NOT NULL,
        snapshot_json   TEXT NOT NULL,
        created_by      TEXT NOT NULL,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL
    )
    """,
    "CREATE INDEX rollouts_state ON rollouts (state)",
    """
    CREATE TABLE rollout_devices (
        rollout_id  TEXT NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
        device_id   TEXT NOT NULL,
        stage       INTEGER NOT NULL,
        state       TEXT NOT NULL,
        detail_json TEXT NOT NULL,
        updated_at  REAL NOT NULL,
        PRIMARY KEY (rollout_id, device_id)
    )
    """,
    """
    CREATE TABLE runs (
        run_id      TEXT PRIMARY KEY,
        config_json TEXT NOT NULL,
        state       TEXT NOT NULL
                    CHECK (state IN ('running', 'finished', 'failed', 'interrupted')),
        created_by  TEXT NOT NULL,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    )
    """,
    """
    CREATE TABLE rounds (
        run_id       TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
        round        INTEGER NOT NULL,
        status       TEXT NOT NULL,
        reason       TEXT NOT NULL,
        metrics_json TEXT NOT NULL,
        started_at   REAL NOT NULL,
        finished_at  REAL,
        PRIMARY KEY (run_id, round)
    )
    """,
    """
    CREATE TABLE telemetry (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id    TEXT NOT NULL,
        received_at  REAL NOT NULL,
        window_start REAL NOT NULL,
        window_end   REAL NOT NULL,
        model        TEXT,
        version      INTEGER,
        predictions  INTEGER NOT NULL,
        errors       INTEGER NOT NULL,
        p50          REAL NOT NULL,
        p95          REAL NOT NULL,
        p99          REAL NOT NULL,
        cpu_percent  REAL NOT NULL,
        memory_bytes INTEGER NOT NULL,
        seq          INTEGER NOT NULL
    )
    """,
    "CREATE INDEX telemetry_device_end ON telemetry (device_id, window_end)",
    "CREATE INDEX telemetry_received ON telemetry (received_at)",
    """
    CREATE TABLE audit (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          REAL NOT NULL,
        actor       TEXT NOT NULL,
        role        TEXT NOT NULL,
        action      TEXT NOT NULL,
        target      TEXT NOT NULL,
        detail_json TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE tokens (
        token_id     TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        role         TEXT NOT NULL CHECK (role IN ('viewer', 'operator')),
        hash         TEXT NOT NULL UNIQUE,
        created_at   REAL NOT NULL,
        revoked_at   REAL,
        last_used_at REAL
    )
    """,
)

_V2 = (
    # A window delivered twice (MQTT QoS 1 after a reconnect) is stored once.
    "DELETE FROM telemetry WHERE id NOT IN (SELECT MIN(id) FROM telemetry "
    "GROUP BY device_id, seq, window_start, window_end, COALESCE(model, ''))",
    "CREATE UNIQUE INDEX telemetry_window ON telemetry "
    "(device_id, seq, window_start, window_end, COALESCE(model, ''))",
)

_V3 = (
    # NULL: the token never expires, which keeps every token made before this step
    # valid exactly as it was.
    "ALTER TABLE tokens ADD COLUMN expires_at REAL",
)

_V4 = (
    # Drift scores against each model version's reference profile (issue 18): one row
    # per computed score; device_id is '' for a fleet-wide score. The whole score is
    # the JSON column; psi_max is a column for the latest-per-subject queries.
    """
    CREATE TABLE drift_scores (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        scope      TEXT NOT NULL CHECK (scope IN ('device', 'fleet')),
        device_id  TEXT NOT NULL DEFAULT '',
        model      TEXT NOT NULL,
        version    INTEGER NOT NULL,
        at         REAL NOT NULL,
        psi_max    REAL NOT NULL,
        score_json TEXT NOT NULL
    )
    """,
    "CREATE INDEX drift_subject ON drift_scores (scope, device_id, model, version, id)",
    "CREATE INDEX drift_at ON drift_scores (at)",
)

_V5 = (
    # Devices an operator enrolled (fedge device enroll): pending until the device
    # redeems its token, accepted once its broker account exists, revoked after.
    """
    CREATE TABLE registry (
        device_id   TEXT PRIMARY KEY,
        state       TEXT NOT NULL CHECK (state IN ('pending', 'accepted', 'revoked')),
        credential  TEXT CHECK (credential IN ('password', 'certificate')),
        created_by  TEXT NOT NULL,
        created_at  REAL NOT NULL,
        accepted_at REAL,
        revoked_at  REAL,
        updated_at  REAL NOT NULL
    )
    """,
    # One-time enrollment tokens: only their SHA-256 is kept, bound to one device.
    """
    CREATE TABLE enrollment_tokens (
        hash       TEXT PRIMARY KEY,
        device_id  TEXT NOT NULL REFERENCES registry (device_id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at    REAL
    )
    """,
    "CREATE INDEX enrollment_tokens_device ON enrollment_tokens (device_id)",
)

_V6 = (
    # Retraining policies (issue 18): one per model, the whole policy as JSON.
    """
    CREATE TABLE retraining_policies (
        name        TEXT PRIMARY KEY,
        policy_json TEXT NOT NULL,
        updated_by  TEXT NOT NULL,
        updated_at  REAL NOT NULL
    )
    """,
    # The runs a policy started and how far each went (training, evaluation,
    # packaging, approval, rollout); no foreign key to runs or policies: the record
    # outlives a deleted policy, and the cooldown reads it.
    """
    CREATE TABLE retraining_runs (
        run_id       TEXT PRIMARY KEY,
        policy       TEXT NOT NULL,
        state        TEXT NOT NULL,
        trigger_json TEXT NOT NULL,
        detail_json  TEXT NOT NULL,
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL
    )
    """,
    "CREATE INDEX retraining_runs_policy ON retraining_runs (policy, created_at)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "devices, artifacts, rollouts, runs, telemetry, audit, tokens", _V1),
    Migration(2, "telemetry windows stored once", _V2),
    Migration(3, "API tokens can expire", _V3),
    Migration(4, "drift scores", _V4),
    Migration(5, "device registry and enrollment tokens", _V5),
    Migration(6, "retraining policies and their runs", _V6),
)
"""Every schema step, in order; ``MIGRATIONS[n - 1]`` produces version ``n``."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code reads and writes."""
