"""The schema of ``agent.toml``: every key of the agent's config file, once.

This is the one place where a key of the agent's config is named, documented, given
its default and its ``fedge-agent run`` flag (see :mod:`edge_agent.config.schema`
for what is derived from it). :mod:`edge_agent.config.agent` holds the typed
dataclasses the file is read into (their defaults come from here) and the rules that
span keys (the broker URL, the password sources, the trusted keys).

The generated example, ``edge_agent/config/agent.example.toml``, is what
``fedge-agent init`` writes; regenerate it after an edit here with
``python -m edge_agent.config.schema --write``.
"""

from __future__ import annotations

import dataclasses

from edge_agent.config.schema import Key, Schema, Section

__all__ = ["AGENT_SCHEMA", "BROKER_URL", "broker_login_keys", "trust_section"]

_TOP = Section(
    "",
    (
        Key(
            "device_id",
            "This device's name: 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or "
            "digit). It is also the MQTT username.",
            example="pi-kitchen-01",
            required=True,
            flag="--device-id",
            metavar="ID",
        ),
        Key(
            "data_dir",
            "Where the agent keeps installed models, version counters and unsent "
            "telemetry; created on first start.",
            example="/var/lib/fedge-agent",
            required=True,
            read="path",
            flag="--data-dir",
            metavar="DIR",
        ),
        Key(
            "tags",
            "Hardware tags: a model that needs tags this device lacks is refused.",
            default=(),
            default_doc="no tags",
            example=["arm64", "camera"],
            commented=True,
            read="array",
            flag="--tag",
            metavar="TAG",
        ),
        Key(
            "runtime",
            'Preferred inference runtime: "onnxruntime" or "tflite".',
            default_doc="automatic (whatever the model's format needs and is installed)",
            example="onnxruntime",
            commented=True,
            flag="--runtime",
            metavar="NAME",
        ),
        Key(
            "http",
            "Local inference endpoint, HOST:PORT. Keep it on 127.0.0.1: a non-loopback "
            "address is refused unless http_token_file is set.",
            default_doc="off",
            example="127.0.0.1:8080",
            commented=True,
            flag="--http",
            metavar="HOST:PORT",
        ),
        Key(
            "http_token_file",
            "File holding a bearer token (at least 16 of A-Za-z0-9._~+/-, e.g. from "
            "`openssl rand -hex 32`; surrounding whitespace is stripped). When set, every "
            "endpoint but /v1/health requires the header Authorization: Bearer TOKEN, "
            "and http may bind a non-loopback address (there is no TLS: the token "
            "travels in clear on a network).",
            default_doc="no token (the endpoint then listens on loopback only)",
            example="/etc/fedge-agent/http-token",
            commented=True,
            read="path",
            flag="--http-token-file",
            metavar="FILE",
        ),
        Key(
            "http_allowed_hosts",
            "Host names (or addresses) the endpoint answers to besides localhost, "
            "127.0.0.1, ::1 and the http bind address: the names remote clients use. "
            "Requests naming another Host are refused (421), which defeats DNS "
            "rebinding; list only names you control.",
            default=(),
            default_doc="none",
            example=["pi-kitchen-01.lan"],
            commented=True,
            read="array",
            flag="--http-allowed-host",
            metavar="NAME",
        ),
        Key(
            "http_socket",
            "Serve the local inference endpoint on this Unix socket (created with mode "
            "0600: only the agent's user, and root, can connect; no Host check, since "
            "no browser can reach it; a stale socket left by a crash is replaced, and "
            "it is removed on stop). Without http it is the only listener (no TCP "
            "port); with http, both serve. Example client: curl --unix-socket PATH "
            "http://localhost/v1/health.",
            default_doc="off",
            example="/run/fedge-agent/http.sock",
            commented=True,
            read="path",
            flag="--http-socket",
            metavar="PATH",
        ),
        Key(
            "log_level",
            "Log level when no -v is given: debug, info, warning, error or critical.",
            default="info",
        ),
    ),
)

BROKER_URL = Key(
    "url",
    "The MQTT broker: mqtts://HOST[:PORT] (TLS, port 8883 by default) or "
    "mqtt://HOST[:PORT] (plain, port 1883 by default).",
    example="mqtts://broker.example.net:8883",
    flag="--broker",
    metavar="URL",
)
"""``broker.url``, as the agent's and the service's schemas both declare it (the
service's is optional: it may run an embedded broker instead)."""


def broker_login_keys(etc: str, client: str, password_env: str) -> tuple[Key, ...]:
    """``password_file``, ``ca_file``, ``cert_file``, ``key_file`` of a ``[broker]`` table.

    The agent's and the service's schemas both log in to the broker with these.

    Args:
        etc: The directory of the example paths (``/etc/fedge-agent``).
        client: The client certificate's example name, without extension.
        password_env: The environment variable the password falls back to.
    """
    return (
        Key(
            "password_file",
            "File holding the MQTT password (surrounding whitespace is stripped).",
            default_doc=f"the {password_env} environment variable, else no password",
            example=f"{etc}/password",
            commented=True,
            read="path",
            flag="--password-file",
            metavar="FILE",
        ),
        Key(
            "ca_file",
            "CA bundle that verifies the broker's certificate (mqtts:// only).",
            default_doc="the system's CAs",
            example=f"{etc}/ca.pem",
            commented=True,
            read="path",
            flag="--ca-file",
            metavar="FILE",
        ),
        Key(
            "cert_file",
            "Client certificate, for brokers that require mutual TLS; it may hold its key too.",
            example=f"{etc}/{client}.pem",
            commented=True,
            read="path",
            flag="--cert-file",
            metavar="FILE",
        ),
        Key(
            "key_file",
            "The client certificate's private key, when cert_file does not hold it.",
            example=f"{etc}/{client}.key",
            commented=True,
            read="path",
            flag="--key-file",
            metavar="FILE",
        ),
    )


_BROKER = Section(
    "broker",
    (
        dataclasses.replace(BROKER_URL, required=True),
        Key(
            "username",
            "MQTT username.",
            default_doc="device_id (the broker's ACL expects exactly that)",
            example="pi-kitchen-01",
            commented=True,
            flag="--username",
            metavar="NAME",
        ),
        Key(
            "password",
            "The MQTT password itself. It leaves the secret in this file: prefer "
            "password_file. Give one of password and password_file, not both.",
            default_doc="see password_file",
            example="change-me",
            commented=True,
        ),
        *broker_login_keys("/etc/fedge-agent", "client", "FEDGE_AGENT_PASSWORD"),
        Key("keepalive_s", "MQTT keepalive in seconds (1-65535).", default=30),
        Key(
            "reconnect_min_s",
            "First delay before reconnecting after a lost connection, in seconds.",
            default=1.0,
        ),
        Key(
            "reconnect_max_s",
            "Longest delay between reconnection attempts (the backoff's cap), in seconds.",
            default=60.0,
        ),
    ),
)


def trust_section(
    keys_help: str, example: str, signed: str, extra: tuple[Key, ...] = ()
) -> Section:
    """The ``[trust]`` table: ``keys`` (``--trust``) and ``threshold`` (``--threshold``).

    The agent's and the service's schemas both have it; they differ only in what the
    keys sign (``signed``), their help text, the example path and ``extra`` keys
    (the agent's key set and fleet).
    """
    return Section(
        "trust",
        (
            Key(
                "keys",
                keys_help,
                default=(),
                default_doc="",
                example=[example],
                read="paths",
                flag="--trust",
                metavar="KEY.pub",
            ),
            Key(
                "threshold",
                f"How many distinct trusted keys must sign {signed} (1 to the number of keys).",
                default=1,
                flag="--threshold",
                metavar="K",
            ),
            *extra,
        ),
    )


_TRUST = trust_section(
    "Public keys whose signatures this agent accepts on models (from the "
    "operator's `fedge keys generate`). At least one is required.",
    "/etc/fedge-agent/keys/release.pub",
    "a model",
    (
        Key(
            "keyset",
            "A signed key set (from `fedge keys keyset-init`, or written by "
            "`fedge-agent enroll`): the keys and threshold this agent trusts, which "
            "rotate over MQTT. Replaces `keys` and `threshold` when given.",
            default=None,
            default_doc="",
            example="/etc/fedge-agent/keys/keyset.json",
            commented=True,
            read="path",
            flag="--keyset",
            metavar="KEYSET",
        ),
        Key(
            "fleet",
            "The fleet this device belongs to. When set, a model is installed only if "
            "a fresh signed fleet statement for this fleet names it (its name, version "
            "and sha256).",
            default=None,
            default_doc="",
            example="production",
            commented=True,
            flag="--fleet",
            metavar="FLEET",
        ),
    ),
)

_TELEMETRY = Section(
    "telemetry",
    (
        Key(
            "interval_s",
            "Seconds between telemetry reports.",
            default=10.0,
            flag="--telemetry-interval",
            metavar="S",
        ),
        Key(
            "spool_max_bytes",
            "Most bytes of telemetry kept on disk while the broker is unreachable; the "
            "oldest goes first (at least 4096).",
            default=1024 * 1024,
            default_doc="1048576 (1 MiB)",
        ),
    ),
)

_TRANSFER = Section(
    "transfer",
    (
        Key("window", "Model chunks requested at once (1-1024).", default=16),
        Key(
            "stall_timeout_s",
            "Seconds without progress before missing chunks are requested again.",
            default=5.0,
        ),
    ),
)

_TRAINING = Section(
    "training",
    (
        Key(
            "data",
            "Local training data for federated rounds: a directory of .npz files "
            "(arrays x and y) and/or .csv files (numeric columns, the label last). Raw "
            "data never leaves the device; only encoded model updates do.",
            default_doc="none (the agent takes part in rounds once labelled feedback arrives)",
            example="/var/lib/fedge-agent/training-data",
            commented=True,
            read="path",
            flag="--train-data",
            metavar="DIR",
        ),
        Key(
            "holdout_fraction",
            "Share of the local examples kept out of training for evaluation rounds (0 to 0.9).",
            default=0.2,
        ),
        Key(
            "feedback_max_examples",
            "Labelled feedback (POST /v1/feedback): most examples kept on disk, the "
            "oldest going first; 0 turns feedback off.",
            default=10_000,
        ),
        Key(
            "prediction_log",
            "Recent predictions whose inputs are remembered so feedback can label them.",
            default=1024,
        ),
        Key(
            "models",
            "PyTorch model factories (module.path:function) this device may train in "
            "federated rounds, besides the built-in zoo (zoo:small_cnn, zoo:sensor_cnn, "
            "zoo:dense_autoencoder, zoo:mlp_regressor) and the factories installed "
            'packages offer as "fedge.models" entry points. The code must be installed on '
            "this device: a round never sends model code, and a task for a model not on "
            "this list is refused (unknown_model). Needs fedge[torch].",
            default=(),
            default_doc="the zoo and the installed entry points only",
            example=["mypkg.models:small_cnn"],
            commented=True,
            read="array",
        ),
        Key(
            "torch_threads",
            "Threads PyTorch may use while training (at least 1). The default leaves a "
            "core free for inference.",
            default_doc="the number of CPUs minus one, at least 1",
            example=2,
            commented=True,
        ),
    ),
)

AGENT_SCHEMA = Schema(
    title=(
        "fedge-agent configuration (TOML). Run with: fedge-agent run --config agent.toml"
        "\n\nCommand-line flags override these values. Relative paths are relative to "
        "this file's directory."
    ),
    sections=(_TOP, _BROKER, _TRUST, _TELEMETRY, _TRANSFER, _TRAINING),
    example_package="edge_agent.config",
    example_name="agent.example.toml",
    replace_together=(("broker.password", "broker.password_file"),),
)
"""Every key of ``agent.toml``."""
