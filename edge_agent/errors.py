"""The one exception tree of the ``edge_agent`` package.

Everything the agent and its wire protocol raise on purpose derives from
:class:`AgentError`. Adapters (paho-mqtt, onnxruntime, the filesystem) translate
foreign errors into this tree. Errors from :mod:`compress` (artifact trust) are a
separate tree and are reported as they are, with their ``code``.

The tree::

    AgentError
    ├── ConfigError                 agent configuration is invalid
    │   └── AddressError                not a host, a port or HOST:PORT
    ├── ProtocolError               a message or topic cannot be accepted
    │   ├── MessageTooLargeError        over a size limit (checked before allocating)
    │   ├── MalformedMessageError       framing, JSON, field types or values are wrong
    │   │   └── SummaryError                a telemetry window summary is inconsistent
    │   ├── UnknownMessageTypeError     the type is not one this side understands
    │   ├── UnsupportedVersionError     a schema version newer than this side speaks
    │   └── TopicError                  a topic outside the tree, or a bad device id
    ├── ModelRuntimeError           a model could not be loaded or run
    │   ├── NoModelError                no model is installed to serve predictions
    │   ├── InvalidInputError           a prediction's input breaks the manifest's spec
    │   └── ExplainError                an explanation request is refused (cost, target)
    │                                   (shape, dtype, NaN/inf, out of range): refused
    ├── BrokerError                 the MQTT broker refused us or cannot be reached
    ├── EnrollmentFailedError       ``fedge-agent enroll`` could not enroll this device
    ├── StateError                  the agent's files on disk are unusable
    │   └── UntrustedModelError         an installed model fails re-verification against
    │                                   its signed manifest (not served)
    ├── InstallError                an update could not be installed (the old model
    │   │                           keeps serving)
    │   ├── TransferError               a transfer's chunks or totals do not add up
    │   └── HealthCheckError            the new model failed its health check
    └── TrainingError               local training or evaluation cannot run
        ├── TrainConfigError            a training setting from the coordinator is invalid
        ├── DataSourceError             local data is missing, unreadable or inconsistent
        │   └── NoDataError                 there is no local data to train on at all
        ├── UnknownModelError           a model spec not installed and allowed here
        ├── TorchUnavailableError       a PyTorch model, and no PyTorch on this device
        ├── InvalidLabelError           labelled feedback carries an unusable label
        └── UnknownPredictionError      feedback names a prediction the agent no longer
                                        remembers (or that was already labelled)

Each class carries a short, stable ``code`` that travels in error messages.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error raised by :mod:`edge_agent`."""

    code = "agent_error"


class ConfigError(AgentError):
    """The agent's configuration is invalid."""

    code = "bad_config"


class AddressError(ConfigError):
    """Text is not a host, a port or ``HOST:PORT`` (:mod:`edge_agent.transport.address`)."""

    code = "bad_address"


class ProtocolError(AgentError):
    """A message or topic cannot be accepted."""

    code = "protocol_error"


class MessageTooLargeError(ProtocolError):
    """A message, header, body or array is larger than its limit."""

    code = "too_large"


class MalformedMessageError(ProtocolError):
    """A message's framing, JSON, field types or field values are invalid."""

    code = "malformed"


class SummaryError(MalformedMessageError):
    """A telemetry window summary is malformed or inconsistent.

    Wrong sizes, counts that do not add up to the window's row count, too many
    features or classes (:mod:`edge_agent.protocol.messages_summary`).
    """

    code = "bad_summary"


class UnknownMessageTypeError(ProtocolError):
    """The message type is not one this side understands."""

    code = "unknown_type"


class UnsupportedVersionError(ProtocolError):
    """The message's schema version is newer than this side speaks."""

    code = "unsupported_version"


class TopicError(ProtocolError):
    """A topic is outside the fedge tree, or carries an invalid device id."""

    code = "bad_topic"


class ModelRuntimeError(AgentError):
    """A model could not be loaded or run by an inference runtime."""

    code = "runtime_error"


class NoModelError(ModelRuntimeError):
    """A prediction was asked for while no model is installed."""

    code = "no_model"


class InvalidInputError(ModelRuntimeError):
    """A prediction's input does not fit the served model's manifest; it is refused.

    ``reason`` is one of ``shape``, ``dtype``, ``nan`` (NaN or infinite values) and
    ``out_of_range`` (outside the reference profile's value range); it is the reason
    the agent counts in its telemetry and the HTTP API returns (status 422).
    """

    code = "invalid_input"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ExplainError(ModelRuntimeError):
    """An explanation cannot be computed for this request; it is refused before the
    model runs (:mod:`edge_agent.monitoring.explain`).

    ``reason`` is ``examples`` (not exactly one example), ``target`` (a class index
    outside the model's first output), ``inputs`` (a model with several inputs, or a
    non-numeric one) or ``too_costly`` (more evaluations than
    :data:`~edge_agent.monitoring.explain.MAX_EVALUATIONS`); the HTTP API answers 422.
    """

    code = "cannot_explain"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BrokerError(AgentError):
    """The MQTT broker refused the connection or cannot be reached."""

    code = "broker_error"


class EnrollmentFailedError(AgentError):
    """``fedge-agent enroll`` could not enroll this device: the coordinator refused the
    token or cannot be reached, its answer is malformed, or a file cannot be written."""

    code = "enrollment_failed"


class StateError(AgentError):
    """The agent's state on disk (data directory, slots, staging) is unusable."""

    code = "state_error"


class UntrustedModelError(StateError):
    """An installed model fails re-verification against its signed manifest.

    Raised at start-up (and before a rollback) when a slot's manifest is missing,
    unsigned or signed by too few trusted keys, names another model than
    ``state.json`` does, or its payload's length or sha256 differs. The model is
    not served. ``cause_code`` is the code of the underlying error.
    """

    code = "untrusted_model"

    def __init__(self, message: str, *, cause_code: str) -> None:
        """Carry the message and the underlying error's code."""
        super().__init__(message)
        self.cause_code = cause_code


class InstallError(AgentError):
    """An update could not be installed; the previous model keeps serving."""

    code = "install_failed"


class TransferError(InstallError):
    """A transfer does not match its deploy command or manifest, or cannot be stored."""

    code = "transfer_error"


class HealthCheckError(InstallError):
    """The new model's outputs on the reference inputs, or its latency, are off."""

    code = "health_check_failed"


class TrainingError(AgentError):
    """Local training or evaluation cannot run (bad weights, data, or divergence)."""

    code = "training_error"


class TrainConfigError(TrainingError):
    """A training setting (from the coordinator's task config) is invalid."""

    code = "bad_train_config"


class DataSourceError(TrainingError):
    """Local training data is missing, unreadable, malformed or inconsistent."""

    code = "bad_data"


class NoDataError(DataSourceError):
    """There is no local data at all to train or evaluate on."""

    code = "no_data"


class UnknownModelError(TrainingError):
    """A model spec that is malformed or not installed and allowed on this device."""

    code = "unknown_model"


class TorchUnavailableError(TrainingError):
    """A PyTorch model was asked of a device without PyTorch (``fedge[torch]``)."""

    code = "no_torch"


class InvalidLabelError(TrainingError):
    """Labelled feedback carries a label that is not a valid class index."""

    code = "bad_label"


class UnknownPredictionError(TrainingError):
    """Feedback names a prediction that is unknown, forgotten, or already labelled."""

    code = "unknown_prediction"
