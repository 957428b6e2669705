"""A device's own key and certificate signing request, for mutual TLS.

``fedge-agent enroll`` makes the device's MQTT identity on the device: a fresh
EC P-256 private key that never leaves it, and a CSR whose CN is the device id.
The fleet's CA (:mod:`coordinator.link.ca`, ``fedge ca issue``) signs a client
certificate for the CSR's public key with CN = the device id; with
``use_identity_as_username`` the broker takes that CN as the device's username,
so the ACL keeps the device to its own topics.

Workflow::

    key_pem, csr_pem = make_key_and_csr("cam-1")
    # write key_pem with mode 0600; send csr_pem to the coordinator; store the
    # certificate it returns; point [broker] key_file / cert_file at both.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.protocol.topics import validate_device_id

__all__ = ["make_key_and_csr"]


def make_key_and_csr(device_id: str) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a CSR with CN = ``device_id``: (key PEM, CSR PEM).

    The key is unencrypted PKCS#8 PEM: store it with mode 0600 (e.g. with
    :func:`compress.fileio.atomic_write`), as the agent reads it at every start.

    Raises:
        TopicError: ``device_id`` is not a valid device id.
    """
    validate_device_id(device_id)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)
