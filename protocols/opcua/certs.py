"""Self-signed application certificates for OPC UA security (tests, demos, first set-up).

OPC UA peers check that an application certificate names the application URI (and
usually the host) in its subjectAltName; these helpers write such a pair: the
certificate in DER, the private key in PEM (PKCS#8, unencrypted).
"""

from __future__ import annotations

import socket
from pathlib import Path

from asyncua.crypto import cert_gen
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = ["CLIENT_APPLICATION_URI", "SERVER_APPLICATION_URI", "generate_certificate"]

CLIENT_APPLICATION_URI = "urn:iiot:edge-agent"
SERVER_APPLICATION_URI = "urn:iiot:simulator"


def generate_certificate(
    cert_path: Path | str,
    key_path: Path | str,
    *,
    application_uri: str,
    common_name: str | None = None,
    hostname: str | None = None,
    days: int = 365,
) -> tuple[Path, Path]:
    """Write a self-signed certificate (DER) and its RSA-2048 key (PEM); returns both paths."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    host = hostname or socket.gethostname()
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(application_uri),
        x509.DNSName(host),
    ]
    if host != "localhost":
        names.append(x509.DNSName("localhost"))
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        common_name or application_uri,
        {},
        names,
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        days=days,
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    return cert_path, key_path
