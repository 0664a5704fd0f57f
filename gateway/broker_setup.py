"""First-time files of the broker the gateway manages: auth files and TLS certificates.

``iiot gateway init-broker`` calls these before Mosquitto's first start, so the broker's
configuration names only files that exist and that its own user can read. Neither
function overwrites an existing file; each returns one line per file it made or kept.
"""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import os
import pwd
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import BrokerAuthConfig

__all__ = ["BrokerSetupError", "init_auth_files", "make_certificates"]

_CA_DAYS = 3650
_SERVER_DAYS = 825  # the longest validity TLS clients commonly accept for a server


class BrokerSetupError(RuntimeError):
    """A file could not be made; names the file, user or group."""


def _ids(owner: str | None, group: str | None) -> tuple[int, int]:
    try:
        uid = pwd.getpwnam(owner).pw_uid if owner else os.getuid()
    except KeyError:
        raise BrokerSetupError(f"no user named {owner!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else pwd.getpwuid(uid).pw_gid
    except KeyError:
        raise BrokerSetupError(f"no group named {group!r}") from None
    return uid, gid


def _place(path: Path, mode: int, uid: int, gid: int) -> None:
    try:
        os.chown(path, uid, gid)
        path.chmod(mode)
    except OSError as exc:
        raise BrokerSetupError(f"{path}: {exc.strerror or exc}") from exc


def init_auth_files(auth: BrokerAuthConfig, *, owner: str | None = None) -> list[str]:
    """Empty password and ACL files (0640, ``owner``:``file_group``) in a 0750 folder.

    ``owner`` is the user the gateway runs as (default: the caller); the folder is the
    owner's so the gateway can replace the files atomically.
    """
    if auth.password_file is None or auth.acl_file is None:
        raise BrokerSetupError("broker_auth.password_file and broker_auth.acl_file are not set")
    uid, gid = _ids(owner, auth.file_group)
    done: list[str] = []
    for path in (auth.password_file, auth.acl_file):
        folder = path.parent
        if not folder.is_dir():
            try:
                folder.mkdir(parents=True)
            except OSError as exc:
                raise BrokerSetupError(f"{folder}: {exc.strerror or exc}") from exc
            done.append(f"made    {folder}/ (0750)")
        _place(folder, 0o750, uid, gid)
        if path.exists():
            done.append(f"kept    {path}")
        else:
            try:
                path.touch()
            except OSError as exc:
                raise BrokerSetupError(f"{path}: {exc.strerror or exc}") from exc
            done.append(f"made    {path} (0640)")
        _place(path, 0o640, uid, gid)
    return done


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes, mode: int, gid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    _place(path, mode, os.getuid(), gid)


def make_certificates(
    certs_dir: Path, hostnames: list[str], *, key_group: str | None = None
) -> list[str]:
    """A CA (``ca.crt``, ``ca.key`` 0600) and a server certificate it signs for ``hostnames``.

    ``server.key`` is 0640 with group ``key_group`` (the broker's). Names that parse as IP
    addresses become IP subject alternative names; localhost and 127.0.0.1 are always in.
    """
    _uid, gid = _ids(None, key_group)
    ca_crt, ca_key_path = certs_dir / "ca.crt", certs_dir / "ca.key"
    srv_crt, srv_key = certs_dir / "server.crt", certs_dir / "server.key"
    if all(p.exists() for p in (ca_crt, ca_key_path, srv_crt, srv_key)):
        return [f"kept    {p}" for p in (ca_crt, ca_key_path, srv_crt, srv_key)]
    if any(p.exists() for p in (ca_crt, ca_key_path, srv_crt, srv_key)):
        raise BrokerSetupError(
            f"{certs_dir} holds some of ca.crt, ca.key, server.crt, server.key but not all; "
            "move them away or complete them yourself"
        )
    certs_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM
    no_pass = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"iiot broker CA ({socket.gethostname()})")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    names = list(dict.fromkeys([*hostnames, "localhost", "127.0.0.1"]))
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    try:
        _write_private(ca_key_path, ca_key.private_bytes(pem, pkcs8, no_pass), 0o600, os.getgid())
        _write_private(srv_key, key.private_bytes(pem, pkcs8, no_pass), 0o640, gid)
        ca_crt.write_bytes(ca.public_bytes(pem))
        srv_crt.write_bytes(server.public_bytes(pem))
        ca_crt.chmod(0o644)
        srv_crt.chmod(0o644)
    except OSError as exc:
        raise BrokerSetupError(f"{certs_dir}: {exc.strerror or exc}") from exc
    return [
        f"made    {ca_crt} (give it to agents and the gateway as mqtt.ca_file)",
        f"made    {ca_key_path} (0600; keep it offline once the server certificate is made)",
        f"made    {srv_crt} for {', '.join(names)}",
        f"made    {srv_key} (0640, group {grp.getgrgid(gid).gr_name})",
    ]
