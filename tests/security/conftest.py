"""Certificates for the security tests: a cluster CA (as ``asap up --tls`` makes it) and a second,
unrelated CA, both written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from asap.certs import ensure_cluster_certs


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    ensure_cluster_certs(directory)
    return directory


@pytest.fixture(scope="session")
def other_tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates from another CA: valid, but not the cluster's."""
    directory = tmp_path_factory.mktemp("other-tls")
    ensure_cluster_certs(directory)
    return directory
