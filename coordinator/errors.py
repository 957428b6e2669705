"""The one exception tree of the ``coordinator`` package.

The tree::

    CoordinatorError
    ├── PackagingError              a model could not be packaged as an artifact
    │   └── QualityGateError            int8 fell further behind fp32 than allowed
    │       ├── AccuracyDropError           a classifier lost more accuracy than allowed
    │       └── WorseThanBaselineError      the new model scores below the deployed one
    ├── TargetError                 a device target (all, device:ID, tag:TAG) is malformed
    ├── UpdateRejectedError         a device's update failed validation (never aggregated)
    │   └── UploadRefusedError          a device's chunked upload broke the upload rules
    ├── SummaryRejectedError        a device's window summary cannot be scored for drift
    ├── RunError                    a federated run cannot start or go on
    │   ├── StrategyError               an unknown strategy, or bad strategy arguments
    │   └── DatasetUnavailableError     a real dataset's package or file is not installed
    ├── StoreError                  the coordinator's SQLite state cannot be read or written
    │   ├── SchemaVersionError          the database is newer than this code knows
    │   ├── MigrationError              a schema migration step failed (rolled back)
    │   ├── NotFoundError               no row with that id
    │   ├── ConflictError               a row with that id already exists
    │   ├── ArtifactCorruptError        a stored artifact file is missing or altered
    │   └── DatabaseInUseError          another coordinator process runs this database
    ├── RolloutError                a bad rollout policy, or an operation its state forbids
    ├── PolicyError                 a retraining policy is invalid or cannot be set
    ├── ArtifactRejectedError       an uploaded artifact failed verification (not stored)
    ├── ServiceConfigError          the service's configuration (file or flags) is invalid
    ├── BrokerSetupError            ``fedge broker config`` was given inconsistent settings
    ├── CertificateAuthorityError   the mTLS CA cannot issue or revoke as asked
    ├── FleetStatementError         a fleet statement cannot be made, saved or read
    └── EnrollmentError             a device cannot be enrolled or revoked (see the message)
        └── EnrollmentRefusedError      an enrollment token is unknown, used, expired or
                                        for another device (answered 401, rate-limited)

Errors from :mod:`compress` and :mod:`edge_agent` pass through unchanged; the CLI
turns any of the three trees into a one-line message and a non-zero exit.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of every error raised by :mod:`coordinator`."""

    code = "coordinator_error"


class PackagingError(CoordinatorError):
    """A model could not be packaged (bad inputs, evaluation data, model file)."""

    code = "packaging_failed"


class QualityGateError(PackagingError):
    """The quantized model is worse than the float32 model by more than allowed.

    Raised as such for regression (relative MSE increase) and reconstruction (ROC-AUC
    drop); classifiers raise the subclass :class:`AccuracyDropError`.
    """

    code = "quality_gate"


class AccuracyDropError(QualityGateError):
    """The quantized model lost more accuracy than ``--max-accuracy-drop`` allows."""

    code = "accuracy_drop"


class WorseThanBaselineError(QualityGateError):
    """The new model is worse than the deployed baseline by more than the tolerance.

    ``fedge train --package --baseline`` refuses to sign it (``--allow-worse``
    overrides); see :mod:`coordinator.delivery.baseline`.
    """

    code = "worse_than_baseline"


class TargetError(CoordinatorError):
    """A device target is not ``all``, ``device:ID[,ID...]`` or ``tag:TAG``."""

    code = "bad_target"


class UpdateRejectedError(CoordinatorError):
    """A device's update failed validation; it is counted, never aggregated.

    Attributes:
        reason: One of :data:`coordinator.federated.update_check.REJECT_REASONS`
            (or, for an :class:`UploadRefusedError`, of
            :data:`coordinator.federated.uploads.UPLOAD_REFUSALS`).
    """

    code = "update_rejected"

    def __init__(self, reason: str, detail: str) -> None:
        """Keep the machine-readable reason with the message."""
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class UploadRefusedError(UpdateRejectedError):
    """A device's chunked upload broke the upload rules: chunks smaller than
    4 KiB, a chunk size or total that changed mid-upload, more than the model
    allows, or more bytes in flight than the device's budget. The upload is dropped
    and the report naming it is rejected with the same ``reason``.
    """

    code = "upload_refused"


class SummaryRejectedError(CoordinatorError):
    """A window summary (or a reference profile) cannot be scored for drift.

    Raised by :mod:`coordinator.monitoring.drift` and :mod:`coordinator.monitoring.tracker`
    for counts of the wrong shape, negative, non-finite or fractional counts, an empty
    window, a feature count that does not match the model's profile, or a reference
    that is not a distribution. The tracker drops that device's window, logs it and
    counts it by ``reason``; other devices are unaffected.

    Attributes:
        reason: One of :data:`coordinator.monitoring.drift.REJECT_REASONS` (or of
            :data:`coordinator.monitoring.tracker.TRACKER_REASONS`).
    """

    code = "summary_rejected"

    def __init__(self, reason: str, detail: str) -> None:
        """Keep the machine-readable reason with the message."""
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class RunError(CoordinatorError):
    """A federated run cannot start or go on (bad settings, no eligible devices)."""

    code = "training_failed"


class UploadSpoolError(RunError):
    """The upload spool (where devices' chunked uploads are kept on disk) cannot be
    used: its directory cannot be made or written, belongs to another user or is
    open to others, or the disk is full. At a run's start it stops the run; during
    an upload it refuses that upload only (``upload_storage``).
    """

    code = "upload_spool"


class StrategyError(RunError):
    """An unknown strategy name, an unloadable ``module:Class`` or bad arguments."""

    code = "bad_strategy"


class DatasetUnavailableError(RunError):
    """A real dataset cannot be read: the package that ships it, or its file, is missing.

    The message names the package and file and how to install them
    (``pip install 'fedge[datasets]'``).
    """

    code = "dataset_unavailable"


class StoreError(CoordinatorError):
    """The coordinator's state store failed (SQLite error, bad value, I/O error).

    :mod:`coordinator.service.store` translates :class:`sqlite3.Error` and ``OSError`` into
    this class or a subclass, with the original as ``__cause__``.
    """

    code = "store_error"


class SchemaVersionError(StoreError):
    """The database's schema version is newer than this code knows; it is not opened.

    Attributes:
        found: The database's ``user_version``.
        known: The newest version this code can migrate to.
    """

    code = "schema_too_new"

    def __init__(self, found: int, known: int) -> None:
        """Keep both versions with the message."""
        super().__init__(
            f"database schema version {found} is newer than this fedge knows ({known}); "
            "upgrade fedge or open another database"
        )
        self.found = found
        self.known = known


class MigrationError(StoreError):
    """A schema migration step failed; it was rolled back, the version is unchanged."""

    code = "migration_failed"


class NotFoundError(StoreError):
    """No row with the given id (device, artifact, rollout, run, token)."""

    code = "not_found"


class ConflictError(StoreError):
    """A row with the given id already exists (rollout, run)."""

    code = "conflict"


class ArtifactCorruptError(StoreError):
    """A stored artifact's file is missing, or its sha256 no longer matches its name."""

    code = "artifact_corrupt"


class DatabaseInUseError(StoreError):
    """Another coordinator process has claimed the database.

    See :mod:`coordinator.service.store.owner`.
    """

    code = "database_in_use"


class RolloutError(CoordinatorError):
    """A rollout policy is malformed, or an operation its state forbids.

    Raised for bad canary, wave, duration or threshold values, for resuming a
    halted, aborted or completed rollout, and for a malformed rollout snapshot.
    """

    code = "rollout_error"


class PolicyError(CoordinatorError):
    """A retraining policy is invalid (a bad threshold, count or run setting), or the
    service cannot act on it (no key to sign the retrained models with), or an
    approval names no run waiting for one.
    """

    code = "policy_error"


class ArtifactRejectedError(CoordinatorError):
    """An uploaded artifact is malformed, tampered with, signed by keys the
    coordinator does not trust, or expired; it was not stored."""

    code = "artifact_rejected"


class ServiceConfigError(CoordinatorError):
    """The configuration of ``fedge coordinator serve`` (file or flags) is invalid.

    Raised by :mod:`coordinator.service.config` with a one-line message that names
    the key and, once merged, the file or flag it came from.

    Attributes:
        key: The dotted config key at fault (``broker.url``), or None.
    """

    code = "bad_service_config"

    def __init__(self, message: str, *, key: str | None = None) -> None:
        """Keep the key with the message."""
        super().__init__(message)
        self.key = key


class BrokerSetupError(CoordinatorError):
    """The settings for a generated mosquitto config are inconsistent (e.g. a TLS
    certificate without its key, a port outside 1..65535, an existing output file)."""

    code = "bad_broker_setup"


class EnrollmentError(CoordinatorError):
    """A device cannot be enrolled or revoked: enrollment is not configured, the
    device is already enrolled, its credentials are malformed, or the broker account
    could not be changed."""

    code = "enrollment_error"


class EnrollmentRefusedError(EnrollmentError):
    """An enrollment token is unknown, already used, expired, or was issued for
    another device (or the device was revoked since). The API answers 401 and counts
    it as a failed authentication of the client's address."""

    code = "enrollment_refused"


class CertificateAuthorityError(CoordinatorError):
    """The fleet's mTLS CA (``fedge ca``, :mod:`coordinator.link.ca`) refused or failed:
    a CSR whose CN is not the device id (or with a bad signature or key), a revoked
    device id without ``--force``, a missing or world-readable CA key, an unknown
    device to revoke, a lifetime past the CA's own."""

    code = "ca_refused"


class FleetStatementError(CoordinatorError):
    """A fleet statement cannot be made, saved or read (bad fleet id or lifetime, no
    signing key, an unreadable state file, no valid retained statement)."""

    code = "fleet_statement_error"


class ApiError(CoordinatorError):
    """The coordinator's HTTP API could not do what the client asked.

    Raised by :class:`~coordinator.service.api_client.ApiClient` for an error answer that no
    other class of this tree describes (a 500, a 413, a request the API found
    invalid) and for an answer it cannot read. Messages never hold the token.

    Attributes:
        status: The HTTP status of the answer, None when there was none.
        code: The API's error code when it gave one (else the class's).
    """

    code = "api_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        """Keep the status and the API's error code with the message."""
        super().__init__(message)
        self.status = status
        if code is not None:
            self.code = code


class ApiUnavailableError(ApiError):
    """No answer from the API: connection refused, timed out, or dropped midway.

    The message names the API's URL.
    """

    code = "api_unavailable"


class ApiAuthError(ApiError):
    """The API refused the token (``status`` 401) or the token's role (403)."""

    code = "api_auth"

    def __init__(self, message: str, *, status: int) -> None:
        """Keep the HTTP status (401 or 403) with the message."""
        super().__init__(message, status=status)
