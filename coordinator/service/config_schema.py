"""The schema of ``coordinator.toml``: every key of the service's config file, once.

This is the one place where a key of ``fedge coordinator serve``'s config is named,
documented, given its default and its flag; the machinery that derives the rest
(known keys and hints, merging with the flags, the example file) is the agent's,
:mod:`edge_agent.config.schema`. :mod:`coordinator.service.config` holds the typed
dataclasses the file is read into (their defaults come from here) and the rules that
span keys (one broker, the bind address, the password).

The generated example, ``coordinator/service/coordinator.example.toml``, is what
``fedge coordinator init`` writes; regenerate it after an edit here with
``python -m edge_agent.config.schema --write coordinator.service.config_schema:SERVICE_SCHEMA``.
"""

from __future__ import annotations

import dataclasses

from edge_agent.config.agent_schema import BROKER_URL, broker_login_keys, trust_section
from edge_agent.config.schema import Key, Schema, Section
from edge_agent.protocol import COORDINATOR_SENDER

__all__ = [
    "DEFAULT_BIND_HOST",
    "DEFAULT_BIND_PORT",
    "DEFAULT_EMBEDDED_BROKER_PORT",
    "DEFAULT_SESSION",
    "DEFAULT_TOKEN_HOURS",
    "PASSWORD_ENV",
    "SERVICE_SCHEMA",
]

DEFAULT_BIND_HOST = "127.0.0.1"
"""Where the API listens by default: this machine only."""

DEFAULT_BIND_PORT = 8780
"""The API's default port."""

DEFAULT_EMBEDDED_BROKER_PORT = 1883
"""The embedded broker's default port: MQTT's, so agents on the machine find it."""

DEFAULT_SESSION = "main"
"""The service's persistent MQTT session (under the client id = its username,
``coordinator``) unless ``broker.session`` says otherwise."""

PASSWORD_ENV = "FEDGE_BROKER_PASSWORD"  # noqa: S105 (a variable name, not a secret)
"""Environment variable holding the broker password when no password file is given."""

DEFAULT_TOKEN_HOURS = 24.0
"""How long an enrollment token is valid unless the operator says otherwise."""

_TOP = Section(
    "",
    (
        Key(
            "db",
            "The SQLite database holding the fleet's state: devices, telemetry, "
            "artifacts, rollouts, federated runs, API tokens and the audit log; created "
            'on first start. Back it up with `sqlite3 state.db ".backup copy.db"`.',
            example="state.db",
            required=True,
            read="path",
            flag="--db",
            metavar="PATH",
        ),
        Key(
            "artifact_dir",
            "Where uploaded artifact files are kept.",
            default_doc='"artifacts" next to the database',
            example="artifacts",
            commented=True,
            read="path",
            flag="--artifact-dir",
            metavar="DIR",
        ),
        Key(
            "bind",
            "Address of the HTTP API, HOST:PORT ([v6]:PORT for IPv6). The default is "
            "reachable from this machine only. Any other address makes the API reachable "
            "from the network: it speaks plain HTTP, so put it behind a reverse proxy "
            "that terminates TLS (the service logs a warning).",
            default=f"{DEFAULT_BIND_HOST}:{DEFAULT_BIND_PORT}",
            flag="--bind",
            metavar="HOST:PORT",
        ),
        Key(
            "log_level",
            "Log level: debug, info, warning, error or critical.",
            default="info",
            flag="--log-level",
            metavar="LEVEL",
        ),
        Key(
            "dev",
            "Development mode, for trying fedge on one machine: allows the embedded "
            "broker ([broker] embedded), which accepts any client without a password "
            "and has no ACL, so any process on this machine can act as any device or "
            "as the coordinator. Without it the service refuses to start with the "
            "embedded broker. Never for a real fleet.",
            default=False,
            flag="--dev",
        ),
    ),
)

_BROKER = Section(
    "broker",
    (
        Key(
            "embedded",
            "Run a small MQTT broker (amqtt) inside the service, listening on "
            "127.0.0.1:embedded_port WITHOUT authentication or ACL: for trying fedge "
            "on one machine, with the agents on the same machine; only with dev = true "
            "(--dev). A real fleet uses its own broker (mosquitto with the ACL of "
            "`fedge broker acl`, EMQX, HiveMQ) through url.",
            default=False,
            example=True,
            commented=True,
            flag="--embedded-broker",
        ),
        Key(
            "embedded_port",
            "The embedded broker's port.",
            default=DEFAULT_EMBEDDED_BROKER_PORT,
            commented=True,
            flag="--embedded-broker-port",
            metavar="PORT",
        ),
        dataclasses.replace(BROKER_URL, default_doc=""),
        Key(
            "username",
            "MQTT username: the broker ACL's coordinator account.",
            default=COORDINATOR_SENDER,
            commented=True,
            flag="--username",
            metavar="NAME",
        ),
        *broker_login_keys("/etc/fedge", "coordinator", PASSWORD_ENV),
        Key(
            "session",
            "The name of the service's MQTT session. It is persistent: what devices send "
            "while the service is down or restarting (telemetry, presence, install "
            "reports) waits in the broker and arrives when it is back, up to the "
            "broker's per-client queue (mosquitto: max_queued_messages). "
            '"" for a clean session (nothing kept). '
            "The session lives under the MQTT client id = the "
            "username: a broker from `fedge broker config` binds every client id to its "
            "username, so no device can take it, and two services on one broker need "
            "two usernames.",
            default=DEFAULT_SESSION,
            commented=True,
        ),
    ),
    help="The fleet's MQTT broker. Give exactly one of `embedded = true` and `url`.",
)

_TRUST = trust_section(
    "Public keys uploaded artifacts must be signed by (from `fedge keys "
    "generate`), normally the keys the devices trust: the API refuses (422) an "
    "artifact that is not signed by `threshold` of them, is tampered with or "
    "has expired. At least one is required.",
    "keys/signing.pub",
    "an artifact",
)

_TELEMETRY = Section(
    "telemetry",
    (
        Key(
            "flush_s",
            "Seconds between batched writes of device telemetry to the database.",
            default=0.5,
        ),
        Key(
            "retention_rows",
            "Most telemetry rows kept, the oldest going first; 0: no limit.",
            default=1_000_000,
        ),
        Key("retention_days", "Days telemetry is kept; 0: no limit.", default=7.0),
        Key(
            "drift_windows",
            "Telemetry windows (those with inputs) of each device pooled into its drift "
            "score against the model's reference profile: more is steadier, fewer "
            "detects a shift sooner (docs/monitoring.md).",
            default=6,
        ),
    ),
)

_API = Section(
    "api",
    (
        Key("max_body_mib", "Largest JSON request body, in MiB.", default=1),
        Key(
            "max_artifact_mib",
            "Largest artifact upload, in MiB (held in memory while it is verified).",
            default=512,
        ),
        Key(
            "docs",
            "Serve the API's documentation at /docs, /redoc and /openapi.json, without "
            "a token (it holds no fleet data).",
            default=True,
        ),
        Key(
            "access_log",
            "Log every request at INFO (method, path, status, client).",
            default=True,
        ),
        Key(
            "auth_max_failures",
            "Failed authentications (401) one client address may make within "
            "auth_window_s before it is refused (429, the token not even checked) for "
            "auth_lockout_s. Every failure is logged and audited (auth.fail).",
            default=10,
        ),
        Key(
            "auth_window_s",
            "Seconds over which an address's failed authentications are counted.",
            default=60.0,
        ),
        Key(
            "auth_lockout_s",
            "Seconds an address is refused (429) after too many failed authentications.",
            default=60.0,
        ),
    ),
)

_ROLLOUTS = Section(
    "rollouts",
    (
        Key(
            "tick_s",
            "Seconds between checks of running rollouts (soak times, stage health).",
            default=1.0,
        ),
        Key(
            "min_failed_devices",
            "Fewest failed devices that halt a stage of a rollout (capped at the "
            "stage's size), for rollouts that do not set their own "
            "(--min-failed-devices). A stage halts only when its failures reach this "
            "AND exceed its max_failure share: with 2, one broken or hostile device "
            "cannot halt a stage of two or more, and a canary of one still halts when "
            "it fails. 1: any failure counts.",
            default=2,
        ),
    ),
)

_RUNS = Section(
    "runs",
    (
        Key(
            "upload_budget_mib",
            "Most MiB of chunked update uploads one device may have in flight during "
            "a federated run (kept on disk in upload_dir until its report arrives); "
            "0: four times the largest update the run's model allows.",
            default=0,
        ),
        Key(
            "upload_dir",
            "Where devices' chunked update uploads are spooled on disk while they "
            "arrive (made with mode 0700; refused if another user owns it or others "
            "can open it). Files are deleted when an upload completes or is dropped, "
            "and leftovers of a crashed service when the next run starts.",
            default_doc='"uploads" next to the database',
            example="uploads",
            commented=True,
            read="path",
            flag="--upload-dir",
            metavar="DIR",
        ),
    ),
)

_FLEET = Section(
    "fleet",
    (
        Key(
            "id",
            "The fleet the service keeps a signed fleet statement for: devices with "
            "`trust.fleet` set to this id install only a model the fresh statement names "
            "(name, version and sha256), and report stale when it expires. The service "
            "publishes it retained, re-publishes it at half its lifetime, names each "
            "artifact it deploys (one-shot or rollout stage) before sending it, and names "
            "the previous target again on a rollback. No id: no statement.",
            default=None,
            default_doc="",
            example="production",
            commented=True,
        ),
        Key(
            "keys",
            "Private keys (from `fedge keys generate`) that sign every statement; a "
            "device needs one signature by a key of its trusted key set. Keep them "
            "readable by the service only.",
            default=(),
            default_doc="",
            example=["keys/statement.pem"],
            commented=True,
            read="paths",
        ),
        Key(
            "key_password_file",
            "File whose first line is the password of encrypted `keys` (from `fedge keys "
            "generate --encrypt`); readable by the service only. The service cannot ask "
            "at a prompt.",
            default=None,
            default_doc="",
            example="keys/statement.password",
            commented=True,
            read="path",
        ),
        Key(
            "lifetime_s",
            "Seconds a statement is valid (a device cut off from the coordinator "
            "reports stale within this time).",
            default=21600.0,
        ),
        Key(
            "state_file",
            "Where the statement's targets and last version are kept across restarts.",
            default=None,
            default_doc='"fleet-<id>.statement.json" next to the database',
            example="fleet.statement.json",
            commented=True,
            read="path",
        ),
    ),
    help="The signed, short-lived fleet statement (freshness and targeting).",
)

_ENROLLMENT = Section(
    "enrollment",
    (
        Key(
            "broker_url",
            "The broker URL enrolled devices connect to (mqtts://HOST:8883, or mqtt:// "
            "on a trusted network), as the devices reach it. Enrollment (`fedge device "
            "enroll`, `fedge-agent enroll`) is off until this, password_file, "
            "broker_pid_file and keyset are set.",
            default=None,
            default_doc="",
            example="mqtts://broker.example.com:8883",
            commented=True,
        ),
        Key(
            "broker_ca",
            "The CA certificate (PEM) that signed the broker's TLS certificate; sent to "
            "enrolling devices, which then trust only it for the broker.",
            default=None,
            default_doc="the devices use the system's CAs",
            example="/etc/fedge/broker/ca.crt",
            commented=True,
            read="path",
        ),
        Key(
            "password_file",
            "The broker's mosquitto password file (`fedge broker config` writes it): "
            "each enrolled device's account is added to it, and removed on revocation. "
            "The service must be able to write it.",
            default=None,
            default_doc="",
            example="/etc/fedge/broker/passwd",
            commented=True,
            read="path",
        ),
        Key(
            "broker_pid_file",
            "mosquitto's pid file (`fedge broker config` writes pid_file): after each "
            "change of the password file the service sends mosquitto SIGHUP, which "
            "re-reads it and disconnects a revoked device at once. The broker runs on "
            "this machine.",
            default=None,
            default_doc="",
            example="/etc/fedge/broker/mosquitto.pid",
            commented=True,
            read="path",
        ),
        Key(
            "keyset",
            "The signed key set (`fedge keys keyset-init`) an enrolling device starts "
            "from: its initial trust anchor. Later rotations reach it over MQTT.",
            default=None,
            default_doc="",
            example="/etc/fedge/keys/keyset.json",
            commented=True,
            read="path",
        ),
        Key(
            "fleet",
            "The fleet id written into enrolled devices' agent.toml (trust.fleet); such "
            "devices install only what the fleet statement names.",
            default=None,
            default_doc="the [fleet] id, if any",
            example="production",
            commented=True,
        ),
        Key(
            "ca_dir",
            "The directory of the fleet's CA (`fedge ca init`): with it a device may "
            "enroll for mutual TLS (`fedge-agent enroll --certificate`, a CSR instead of "
            "a password) and gets a certificate from it; revoking it puts its "
            "certificates on the CA's CRL (the broker's crlfile) and disconnects it.",
            default=None,
            default_doc="password accounts only",
            example="/etc/fedge/ca",
            commented=True,
            read="path",
        ),
        Key(
            "token_hours",
            "How long an enrollment token stays valid unless `fedge device enroll "
            "--expires-in` says otherwise, in hours. A token works once.",
            default=DEFAULT_TOKEN_HOURS,
        ),
    ),
    help="Enrolling devices with one-time tokens (fedge device enroll; fedge-agent enroll).",
)

SERVICE_SCHEMA = Schema(
    title=(
        "fedge coordinator service configuration (TOML).\n\n"
        "Run with: fedge coordinator serve --config coordinator.toml\n\n"
        "Command-line flags override these values. Relative paths are relative to this "
        "file's directory."
    ),
    sections=(_TOP, _BROKER, _TRUST, _TELEMETRY, _API, _ROLLOUTS, _RUNS, _FLEET, _ENROLLMENT),
    example_package="coordinator.service",
    example_name="coordinator.example.toml",
    replace_together=(("broker.url", "broker.embedded"),),
)
"""Every key of ``coordinator.toml``."""
