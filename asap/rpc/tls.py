"""Mutual TLS: where a process finds its certificate, key and CA, and the credentials gRPC makes of them.

A ``TlsConfig`` is one identity: the certificate and key this process presents, and the CA it trusts for
its peers. With TLS on, every server asks for and verifies a client certificate signed by that CA
(plaintext and unknown certificates are refused in the handshake), and every channel the process opens
presents its own certificate and verifies the server's (host name included). The file names follow
cert-manager's secrets (``tls.crt``, ``tls.key``, ``ca.crt``), so a mounted secret is a TLS directory as
it stands.

``TlsConfig.from_dir(DIR, role)`` reads ``DIR/ROLE/`` when it holds a certificate (the layout
``asap up --tls DIR`` writes: a directory per service and one for clients), else ``DIR`` itself (a
mounted secret). Imports only grpc and the standard library: the container health check uses it.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from asap.errors import InvalidArgument

__all__ = [
    "CA_FILE",
    "CERT_FILE",
    "CLIENT_ROLE",
    "KEY_FILE",
    "TLS_DIR_ENV",
    "TlsConfig",
    "tls_from_flags",
]

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
CLIENT_ROLE = "client"
"""The sub-directory of a generated TLS directory that holds the client certificate."""
TLS_DIR_ENV = "ASAP_TLS_DIR"
"""A service started without ``--tls-*`` flags reads its TLS directory from here (compose, Kubernetes)."""


@dataclass(frozen=True, slots=True, init=False)
class TlsConfig:
    """The certificate (``cert``) and key (``key``) this process presents and the CA (``ca``) it trusts.

    Files are read when credentials are made (start-up), so a missing or unreadable one is an
    ``InvalidArgument`` naming it, raised before anything listens or connects.
    """

    ca: Path
    cert: Path
    key: Path

    def __init__(self, ca: str | Path, cert: str | Path, key: str | Path) -> None:
        object.__setattr__(self, "ca", Path(ca))
        object.__setattr__(self, "cert", Path(cert))
        object.__setattr__(self, "key", Path(key))

    @classmethod
    def from_dir(cls, directory: str | Path, role: str = CLIENT_ROLE) -> TlsConfig:
        """The identity of ``role`` in ``directory``: ``directory/role/`` if it holds a certificate, else
        ``directory`` itself (a cert-manager secret mounted as it is)."""
        base = Path(directory)
        if (base / role / CERT_FILE).is_file():
            base = base / role
        return cls(ca=base / CA_FILE, cert=base / CERT_FILE, key=base / KEY_FILE)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        contents = []
        for what, path in (("CA", self.ca), ("certificate", self.cert), ("key", self.key)):
            try:
                contents.append(path.read_bytes())
            except OSError as exc:
                raise InvalidArgument(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from exc
        ca, cert, key = contents
        return ca, cert, key

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials of a server that requires a client certificate signed by the CA."""
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a channel that presents this certificate and trusts only the CA."""
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def server_ssl_context(self) -> ssl.SSLContext:
        """The same contract for an HTTPS server (the scheduler's OpenAI door): this certificate, and a
        client certificate signed by the CA required."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_ssl_context(self) -> ssl.SSLContext:
        """An HTTPS client's side: trust only the CA, present this certificate."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


def tls_from_flags(
    cert: str | None, key: str | None, ca: str | None, *, role: str, env: dict[str, str] | None = None
) -> TlsConfig | None:
    """A service's TLS from ``--tls-cert/--tls-key/--tls-ca`` (all three or none), else from the
    directory in ``$ASAP_TLS_DIR``; None: plaintext."""
    if cert and key and ca:
        return TlsConfig(ca=ca, cert=cert, key=key)
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if any(given.values()):
        missing = ", ".join(flag for flag, value in given.items() if not value)
        raise InvalidArgument(f"TLS needs --tls-cert, --tls-key and --tls-ca; missing {missing}")
    directory = (os.environ if env is None else env).get(TLS_DIR_ENV)
    return TlsConfig.from_dir(directory, role) if directory else None
