"""A local certificate authority for a cluster: what ``asap up --tls DIR`` writes (once) and reuses.

    DIR/ca.crt, DIR/ca.key              the CA (its key stays here; nothing else needs it)
    DIR/ROLE/tls.crt, tls.key, ca.crt   for ROLE in scheduler, attention, expert, client

The file names are cert-manager's, so each ROLE directory can become a Kubernetes secret as it is
(``kubectl create secret generic asap-scheduler-tls --from-file=DIR/scheduler``) or be mounted by
docker compose. Service certificates carry both the server and the client usage (a service is both: the
attention ranks serve the scheduler and call the experts) and name localhost, 127.0.0.1, ::1, the
service names of docker/compose.yaml and docker/k8s (``expert-0``, ``expert-0.expert``, ...) and any
extra host given. A certificate that is missing, expires within ``RENEW_BEFORE`` or lacks a wanted name
is (re)issued from the existing CA; the CA itself is made only when there is none.

    python -m asap.certs DIR [--host NAME ...]     writes the same files for compose/Kubernetes
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from asap.rpc.tls import CA_FILE, CERT_FILE, CLIENT_ROLE, KEY_FILE

__all__ = ["RENEW_BEFORE", "SERVICE_ROLES", "ensure_cluster_certs", "service_names"]

SERVICE_ROLES = ("scheduler", "attention", "expert")
RENEW_BEFORE = datetime.timedelta(days=30)
_CA_VALID = datetime.timedelta(days=3650)
_LEAF_VALID = datetime.timedelta(days=397)
_NAMED_RANKS = 16
"""Per-rank service names (``expert-0`` .. ``expert-15``) in every service certificate."""
_LOCAL = ("localhost", "127.0.0.1", "::1")


def service_names(role: str, extra_hosts: Iterable[str] = ()) -> list[str]:
    """The names a ``role`` certificate covers: loopback, the deployments' service names, ``extra_hosts``."""
    names = [*_LOCAL, role, f"*.{role}"]
    if role != "scheduler":
        names += [f"{role}-{r}" for r in range(_NAMED_RANKS)]
    names += [h for h in extra_hosts if h and h not in ("0.0.0.0", "::", "[::]")]
    return list(dict.fromkeys(names))


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only (a key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ensure_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_FILE, directory / "ca.key"
    if cert_path.is_file() and key_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC key")
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asap local CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _CA_VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _current(path: Path, ca: x509.Certificate, names: Sequence[str]) -> bool:
    """Whether the certificate at ``path`` is from ``ca``, valid past ``RENEW_BEFORE`` and names ``names``."""
    if not path.is_file() or not path.with_name(KEY_FILE).is_file():
        return False
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        have = (
            set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
            if names
            else set()
        )
    except (ValueError, x509.ExtensionNotFound):
        return False
    fresh = cert.issuer == ca.subject and cert.not_valid_after_utc - RENEW_BEFORE > _now()
    return fresh and set(_san(names)) <= have


def _issue(
    directory: Path, role: str, names: Sequence[str], ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role != CLIENT_ROLE:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"asap-{role}")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _LEAF_VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(directory / KEY_FILE, _key_pem(key))
    (directory / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / CA_FILE).write_bytes(ca.public_bytes(serialization.Encoding.PEM))


def ensure_cluster_certs(directory: str | Path, extra_hosts: Iterable[str] = ()) -> list[str]:
    """Make (or complete) the TLS directory ``directory``; returns the roles whose certificate was issued
    now (empty when everything was already there and current)."""
    base = Path(directory)
    ca, ca_key = _ensure_ca(base)
    hosts = list(extra_hosts)
    issued = []
    for role in (*SERVICE_ROLES, CLIENT_ROLE):
        names = service_names(role, hosts) if role != CLIENT_ROLE else []
        if not _current(base / role / CERT_FILE, ca, names):
            _issue(base / role, role, names, ca, ca_key)
            issued.append(role)
    return issued


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asap.certs", description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="where to write the CA and the certificates")
    parser.add_argument("--host", action="append", default=[], help="another name or address to cover")
    args = parser.parse_args(argv)
    issued = ensure_cluster_certs(args.directory, args.host)
    print(f"{args.directory}: issued {', '.join(issued) or 'nothing (all current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
