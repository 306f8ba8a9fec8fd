"""containers-certs.d(5): the per-registry certificate directories, in the order containers/image searches them.

containers/image ``docker/docker_client.go`` ``dockerCertDir``: ``--cert-dir`` (``DockerCertPath``) is used alone and
as it is (no per-host subdirectory). Otherwise the candidates are ``$HOME/.config/containers/certs.d/<host[:port]>``,
``/etc/containers/certs.d/<host[:port]>`` and ``/etc/docker/certs.d/<host[:port]>`` -- for root and rootless alike
(the home directory is root's own for root) -- and the **first that exists** is used; one that cannot be accessed for
lack of permission is skipped; the rest are ignored, so directories are never merged. When none exists, no extra
certificates are loaded. :func:`proxy.http.tls.first_cert_dir` (used by ``create_ssl_context``) applies exactly this
rule to the list returned here.

``<host[:port]>`` is the host as written in the reference, port included only when the reference has one
(``registry.example`` and ``registry.example:443`` are different directories); for Docker Hub it is ``docker.io``,
not ``registry-1.docker.io``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ._env import home_dir, under_root
from .errors import ConfigError

USER_CERTS_DIR = ".config/containers/certs.d"
SYSTEM_CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")


def cert_dirs_for(
    authority: str,
    cert_dir: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    root: Path = Path("/"),
) -> list[Path]:
    """The candidate directories for ``authority`` (``host[:port]``), in search order; pass them to
    ``create_ssl_context(cert_dirs, verify=...)``. ``root`` re-roots the /etc paths, not the home directory."""
    if cert_dir is not None and os.fspath(cert_dir) != "":
        return [Path(cert_dir)]
    if not authority or "/" in authority or authority in (".", "..") or "\0" in authority:
        raise ConfigError(f"invalid registry host {authority!r} for a certs.d directory")
    bases = [home_dir(environ) / USER_CERTS_DIR, *(under_root(root, d) for d in SYSTEM_CERTS_DIRS)]
    return [base / authority for base in bases]
