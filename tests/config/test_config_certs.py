"""certs.d directories: order, --cert-dir, and that the first existing one is what the TLS context uses."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, cert_dirs_for
from proxy.http.tls import first_cert_dir
from tests.config.config_fakes import FakeHost


def test_order_for_a_host_with_port(host: FakeHost) -> None:
    dirs = cert_dirs_for("registry.example:5000", environ=host.environ, root=host.root)
    assert dirs == [
        host.home / ".config/containers/certs.d/registry.example:5000",
        host.etc("containers/certs.d/registry.example:5000"),
        host.etc("docker/certs.d/registry.example:5000"),
    ]


def test_cert_dir_flag_is_used_alone_without_a_host_subdirectory(host: FakeHost) -> None:
    assert cert_dirs_for("quay.io", str(host.base / "certs"), environ=host.environ, root=host.root) == [
        host.base / "certs"
    ]


def test_first_existing_directory_wins_and_port_must_match(host: FakeHost) -> None:
    docker = host.etc("docker/certs.d/quay.io")
    docker.mkdir(parents=True)
    (host.etc("containers/certs.d/quay.io:443")).mkdir(parents=True)
    assert first_cert_dir(cert_dirs_for("quay.io", environ=host.environ, root=host.root)) == docker
    containers = host.etc("containers/certs.d/quay.io")
    containers.mkdir(parents=True)
    assert first_cert_dir(cert_dirs_for("quay.io", environ=host.environ, root=host.root)) == containers
    user = host.home / ".config/containers/certs.d/quay.io"
    user.mkdir(parents=True)
    assert first_cert_dir(cert_dirs_for("quay.io", environ=host.environ, root=host.root)) == user
    assert first_cert_dir(cert_dirs_for("other.io", environ=host.environ, root=host.root)) is None


@pytest.mark.parametrize("authority", ["", "..", "a/b", "."])
def test_invalid_authority(host: FakeHost, authority: str) -> None:
    with pytest.raises(ConfigError, match="invalid registry host"):
        cert_dirs_for(authority, environ=host.environ, root=host.root)
