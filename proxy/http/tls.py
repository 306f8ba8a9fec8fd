"""``ssl.SSLContext`` for a registry host, from containers-certs.d(5)-style directories.

The caller passes the candidate directories for one host in search order (for containers:
``~/.config/containers/certs.d/<host[:port]>``, ``/etc/containers/certs.d/<host[:port]>``,
``/etc/docker/certs.d/<host[:port]>``); as in containers/image, the first one that exists is used and the rest are
ignored, and a directory that cannot be read for lack of permission is skipped. In that directory:

- ``*.crt``: CA certificates, trusted in addition to the system store;
- ``*.cert`` + ``*.key`` with the same base name: a client certificate and its key (a missing partner is an error).

No environment, no globals: directories in, context out.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from .errors import TLSConfigError

StrPath = str | os.PathLike[str]


def first_cert_dir(dirs: Sequence[StrPath]) -> Path | None:
    """The first of ``dirs`` that exists and can be listed."""
    for candidate in dirs:
        path = Path(candidate)
        try:
            if path.is_dir():
                os.listdir(path)
                return path
        except PermissionError:
            continue
    return None


def create_ssl_context(
    cert_dirs: Sequence[StrPath] = (),
    *,
    verify: bool = True,
    system_trust: bool = True,
) -> ssl.SSLContext:
    """A client context: the system trust store (unless ``system_trust=False``) plus the CAs and client
    certificate of the first existing directory in ``cert_dirs``. ``verify=False`` (an insecure registry)
    turns off certificate and host name checks; client certificates are still presented."""
    if system_trust:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    directory = first_cert_dir(cert_dirs)
    if directory is not None:
        _load_dir(context, directory)
    return context


def _load_dir(context: ssl.SSLContext, directory: Path) -> None:
    try:
        names = sorted(entry.name for entry in os.scandir(directory) if not entry.is_dir())
    except OSError as e:
        raise TLSConfigError(f"cannot read certificate directory {directory}: {e}") from e
    for name in names:
        path = directory / name
        if name.endswith(".crt"):
            try:
                context.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as e:
                raise TLSConfigError(f"cannot load CA certificate {path}: {e}") from e
        elif name.endswith(".cert"):
            key = directory / (name.removesuffix(".cert") + ".key")
            if not key.exists():
                raise TLSConfigError(f"missing key {key.name} for client certificate {path}")
            try:
                context.load_cert_chain(certfile=path, keyfile=key)
            except (OSError, ssl.SSLError) as e:
                raise TLSConfigError(f"cannot load client certificate {path} with key {key}: {e}") from e
        elif name.endswith(".key"):
            cert = directory / (name.removesuffix(".key") + ".cert")
            if not cert.exists():
                raise TLSConfigError(f"missing client certificate {cert.name} for key {path}")
