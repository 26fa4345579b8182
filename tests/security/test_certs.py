"""The local CA of ``asap up --tls DIR``: layout, names, key permissions, made once and completed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from asap.certs import SERVICE_ROLES, ensure_cluster_certs, service_names
from asap.errors import InvalidArgument
from asap.rpc.tls import TlsConfig, tls_from_flags


def _names(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def test_layout_is_cert_manager_style_with_private_keys(tmp_path: Path) -> None:
    issued = ensure_cluster_certs(tmp_path)
    assert issued == [*SERVICE_ROLES, "client"]
    for role in issued:
        for name in ("tls.crt", "tls.key", "ca.crt"):
            assert (tmp_path / role / name).is_file(), f"{role}/{name}"
        assert stat.S_IMODE((tmp_path / role / "tls.key").stat().st_mode) == 0o600
        assert (tmp_path / role / "ca.crt").read_bytes() == (tmp_path / "ca.crt").read_bytes()
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_service_certificates_name_loopback_and_the_deployments_hosts(tmp_path: Path) -> None:
    ensure_cluster_certs(tmp_path, ["10.1.2.3"])
    expert = _names(tmp_path / "expert" / "tls.crt")
    assert {
        "localhost",
        "127.0.0.1",
        "::1",
        "expert",
        "expert-0",
        "expert-1",
        "*.expert",
        "10.1.2.3",
    } <= expert
    assert {"scheduler", "*.scheduler", "127.0.0.1"} <= _names(tmp_path / "scheduler" / "tls.crt")
    assert "0.0.0.0" not in service_names("attention", ["0.0.0.0"])


def test_made_once_then_reused_and_completed(tmp_path: Path) -> None:
    ensure_cluster_certs(tmp_path)
    ca = (tmp_path / "ca.crt").read_bytes()
    client = (tmp_path / "client" / "tls.crt").read_bytes()
    assert ensure_cluster_certs(tmp_path) == []
    # A new host name reissues the service certificates from the same CA; the client's stays.
    assert ensure_cluster_certs(tmp_path, ["node-7"]) == list(SERVICE_ROLES)
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert (tmp_path / "client" / "tls.crt").read_bytes() == client
    assert "node-7" in _names(tmp_path / "attention" / "tls.crt")
    # A lost key is replaced.
    (tmp_path / "expert" / "tls.key").unlink()
    assert ensure_cluster_certs(tmp_path) == ["expert"]


def test_from_dir_reads_a_role_directory_or_a_mounted_secret(tmp_path: Path) -> None:
    ensure_cluster_certs(tmp_path)
    assert TlsConfig.from_dir(tmp_path).cert == tmp_path / "client" / "tls.crt"
    assert TlsConfig.from_dir(tmp_path, "expert").key == tmp_path / "expert" / "tls.key"
    secret = tmp_path / "expert"  # a secret mounted as it is: tls.crt, tls.key, ca.crt
    assert TlsConfig.from_dir(secret, "expert").ca == secret / "ca.crt"


def test_flags_all_or_none_else_the_environment(tmp_path: Path) -> None:
    assert tls_from_flags(None, None, None, role="expert", env={}) is None
    assert tls_from_flags("c", "k", "a", role="expert", env={}) == TlsConfig(ca="a", cert="c", key="k")
    with pytest.raises(InvalidArgument, match="missing --tls-key, --tls-ca"):
        tls_from_flags("c", None, None, role="expert", env={})
    from_env = tls_from_flags(None, None, None, role="expert", env={"ASAP_TLS_DIR": str(tmp_path)})
    assert from_env == TlsConfig.from_dir(tmp_path, "expert")


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    ensure_cluster_certs(tmp_path)
    with pytest.raises(InvalidArgument, match=r"certificate .*nope\.crt"):
        TlsConfig(ca=tmp_path / "ca.crt", cert=tmp_path / "nope.crt", key="k").server_credentials()
