"""The one exception tree of the ``compress`` package.

Every error that ``compress`` raises on purpose derives from :class:`CompressError`.
Adapters translate foreign exceptions (``cryptography``, ``onnx``, ``onnxruntime``,
``OSError``) into this tree, so callers (the agent, the coordinator, the CLI) need to
catch one base class and can switch on the precise subclass or its stable ``code``.

The tree::

    CompressError
    ├── KeyFileError                key files: missing, unreadable, wrong type, exists
    │   └── KeyPasswordError            an encrypted key's password: unusable
    │       ├── KeyPasswordRequiredError    the key is encrypted and no password was given
    │       └── WrongKeyPasswordError       the password does not decrypt the key
    ├── ManifestError               manifest bytes are not a valid, canonical manifest
    │   ├── KeySetError                 a key set (or its file) is malformed or unusable
    │   ├── StatementError              a fleet statement is malformed or unusable
    │   │   └── WrongFleetError             a statement for another fleet
    │   ├── ProfileError                a reference profile (or the data to compute it) is invalid
    │   └── LineageError                a lineage record (where a model came from) is invalid
    ├── ArtifactError               anything wrong with an artifact or its trust
    │   ├── NotAnArtifactError      not a fedge artifact at all (magic, header, truncation)
    │   ├── SignatureError          signatures do not establish trust
    │   │   ├── BadSignatureError       a trusted key's signature does not verify
    │   │   ├── UnknownKeyError         no signature by any trusted key
    │   │   └── ThresholdError          valid, but fewer than the threshold
    │   ├── ExpiredError            the manifest's (or key set's) expiry is in the past
    │   │   └── StaleStatementError     the fleet statement has expired
    │   │       └── NoStatementError            a fleet is configured, no statement held
    │   ├── RollbackError           version not strictly above the highest installed,
    │   │   │                       or a key set that is not the next version
    │   │   ├── ReplayedStatementError  a fleet statement not newer than the last accepted
    │   │   └── SlotRollbackError       another name, not above the serving slot's floor
    │   ├── NotTargetedError        the fresh fleet statement does not name this model
    │   ├── PayloadError            the payload does not match the manifest
    │   │   ├── PayloadLengthError      too short, too long, or trailing bytes
    │   │   └── PayloadHashError        sha256 mismatch
    │   └── IncompatibleDeviceError runtime, hardware tags do not fit this device
    ├── FamilyError                 weights do not form a built-in model family
    ├── ExportError                 a model could not be exported
    ├── QuantizationError           a model could not be quantized
    ├── MetricError                 a quality metric got inputs it cannot score
    └── CodecError                  an update codec spec, update or payload is invalid
        └── NonFiniteUpdateError        the update holds NaN or infinite values

Key sets (:mod:`compress.keyset`) are signed documents too: their rotation reuses the
trust errors (``SignatureError`` and its subclasses, ``ExpiredError``, ``RollbackError``)
and only malformed key-set documents have a class of their own. Fleet statements
(:mod:`compress.statement`) do the same, with subclasses whose codes say what a device
reports: ``stale_statement``, ``no_statement``, ``replayed_statement``, ``not_targeted``.

Each class carries a short, stable ``code`` (``"bad_signature"``, ``"expired"`` ...)
that travels in protocol messages and JSON output; the message text is for humans.
"""

from __future__ import annotations


class CompressError(Exception):
    """Base class of every error raised by :mod:`compress`."""

    code = "compress_error"


class KeyFileError(CompressError):
    """A key file is missing, unreadable, of the wrong kind, or would be overwritten."""

    code = "key_file"


class KeyPasswordError(KeyFileError):
    """The password of an encrypted private key is missing, wrong or cannot be read.

    Raised for a password file that is unreadable or empty, a password too short to
    encrypt a new key with, and (as subclasses) a missing or wrong password.
    """

    code = "key_password"


class KeyPasswordRequiredError(KeyPasswordError):
    """The private key file is encrypted and no password was given to decrypt it."""

    code = "key_password_required"


class WrongKeyPasswordError(KeyPasswordError):
    """The password given does not decrypt the private key file."""

    code = "wrong_key_password"


class ManifestError(CompressError):
    """Manifest bytes are malformed, non-canonical, or violate the schema."""

    code = "malformed_manifest"


class KeySetError(ManifestError):
    """Key-set bytes are malformed or non-canonical, or a key-set file is unusable.

    Also raised when a key set that is not version 1 is offered as an initial one.
    """

    code = "bad_keyset"


class StatementError(ManifestError):
    """Fleet-statement bytes are malformed or non-canonical, or a statement is unusable."""

    code = "bad_statement"


class WrongFleetError(StatementError):
    """A validly signed fleet statement names another fleet than the device's."""

    code = "wrong_fleet"


class ProfileError(ManifestError):
    """A reference profile is malformed, or the data given to compute one is unusable.

    Raised by :mod:`compress.profile` for a profile document that breaks its schema
    (inside a manifest it is a manifest error too), and for reference data that is
    empty, non-finite, or whose outputs do not fit the task.
    """

    code = "bad_profile"


class LineageError(ManifestError):
    """A lineage record (run, trigger, parent, code version of a model) is malformed.

    Raised by :mod:`compress.lineage` for a record that breaks its schema or its size
    bound; inside a manifest it is a manifest error too.
    """

    code = "bad_lineage"


class ArtifactError(CompressError):
    """Base class for problems with an artifact or with trusting it."""

    code = "artifact_error"


class NotAnArtifactError(ArtifactError):
    """The bytes are not a fedge artifact (wrong magic, bad header, truncated)."""

    code = "not_an_artifact"


class SignatureError(ArtifactError):
    """The signatures of a manifest (or key set) do not establish trust."""

    code = "signature_error"


class BadSignatureError(SignatureError):
    """A signature claims a trusted key id but does not verify over the document."""

    code = "bad_signature"


class UnknownKeyError(SignatureError):
    """None of the signatures was made by a trusted key."""

    code = "unknown_key"


class ThresholdError(SignatureError):
    """Some trusted signatures verify, but fewer than the required threshold."""

    code = "threshold_not_met"


class ExpiredError(ArtifactError):
    """The manifest's (or key set's) ``expires`` time is not after the current time."""

    code = "expired"


class RollbackError(ArtifactError):
    """A version is not strictly above the highest installed, or not the next key set.

    Manifests: the version must exceed the highest ever installed for the model name.
    Key sets: a rotation must be exactly one version above the trusted key set.
    """

    code = "rollback"


class ReplayedStatementError(RollbackError):
    """A fleet statement's version is not above the last one the device accepted."""

    code = "replayed_statement"


class StaleStatementError(ExpiredError):
    """The device's fleet statement has expired, so it cannot vouch for a deploy."""

    code = "stale_statement"


class NoStatementError(StaleStatementError):
    """A fleet is configured but no fleet statement has been accepted yet."""

    code = "no_statement"


class NotTargetedError(ArtifactError):
    """The fresh fleet statement does not name this model, version and sha256."""

    code = "not_targeted"


class SlotRollbackError(RollbackError):
    """A model under another name would replace the serving one at a version not above
    the serving position's floor (the highest version it ever served), and no fleet
    statement vouches for it."""

    code = "slot_rollback"


class PayloadError(ArtifactError):
    """The payload does not match what the signed manifest declares."""

    code = "payload_mismatch"


class PayloadLengthError(PayloadError):
    """The payload is shorter or longer than the manifest's declared length."""

    code = "payload_length"


class PayloadHashError(PayloadError):
    """The payload's sha256 differs from the manifest's."""

    code = "payload_hash"


class IncompatibleDeviceError(ArtifactError):
    """The model does not fit this device (runtime, hardware tags)."""

    code = "incompatible_device"


class FamilyError(CompressError):
    """Weights do not describe a valid model of a built-in family."""

    code = "bad_weights"


class ExportError(CompressError):
    """A model could not be exported to the requested format."""

    code = "export_failed"


class QuantizationError(CompressError):
    """A model could not be quantized (bad model, bad calibration data)."""

    code = "quantization_failed"


class MetricError(CompressError):
    """A quality metric (:mod:`compress.metrics`) was given inputs it cannot score.

    Mismatched or empty arrays, non-finite values, labels other than 0 and 1, or a
    ROC-AUC asked of labels that hold only one class.
    """

    code = "bad_metric_input"


class CodecError(CompressError):
    """An update codec spec, a model update or an encoded update payload is invalid.

    Raised by :mod:`compress.codecs` for an unknown codec spec, an update it refuses to
    encode (non-finite values, values outside fp16 range, a residual that does not
    match) and for every payload it cannot decode (another codec, truncated or
    trailing bytes, corrupt positions or values, a layout over the size limit).
    """

    code = "bad_update"


class NonFiniteUpdateError(CodecError):
    """An update (to encode, or decoded from a payload) holds NaN or infinite values."""

    code = "non_finite_update"


def one_line(exc: BaseException, *, limit: int = 300) -> str:
    """A foreign exception as one short line: its type and its message's first line.

    Adapters use it when they translate errors from onnx, onnxruntime and the like,
    whose messages can run over many lines.
    """
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
