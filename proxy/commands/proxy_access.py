"""What ``inspect``, ``copy`` and ``layers`` share: the flags passed on to the proxy they start, ``--proxy-socket``
for a running daemon instead, and errors turned into something a person can act on.

These commands are clients: they talk to a proxy with the client bindings (``protocol.client``), so what they show
is what an update agent gets through the real protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from protocol.client import ImageProxy
from protocol.client.tasks import failing_fast
from protocol.errors import ErrorCode, ProxyError
from proxy.commands.proxy_flags import CREDENTIAL_FLAGS, GLOBAL_FLAGS, GLOBAL_SWITCHES, SERVE_FLAGS, dest

#: what each flag passed on to the command's proxy does, for --help
_HELPS = {
    "--authfile": "registry credentials file (as written by skopeo login / podman login)",
    "--creds": "USERNAME[:PASSWORD] for the registry",
    "--username": "user name for the registry (with --password)",
    "--password": "password for the registry (with --username)",
    "--registry-token": "bearer token for the registry",
    "--no-creds": "access the registry anonymously",
    "--cert-dir": "CA certificates and client keys for the registry (*.crt, *.cert, *.key)",
    "--shared-blob-dir": "where the blobs of oci: layouts live, if not in each layout",
    "--blob-cache": "keep verified registry blobs in DIR, and resume interrupted downloads from it (see "
    "image-proxy cache)",
    "--blob-cache-max": "evict least recently used cached blobs above SIZE (default 20G)",
    "--config": "image-proxy's own settings file (TOML; default /etc/image-proxy/config.toml if it exists)",
    "--connect-timeout": "DNS + TCP connect deadline, seconds (default 30)",
    "--tls-handshake-timeout": "TLS handshake deadline, seconds (default 10)",
    "--response-header-timeout": "deadline for a registry's response headers, seconds (default 30)",
    "--stall-timeout": "a registry read that gets no byte for this long is resumed (seconds, default 30)",
    "--max-resumes": "how often one blob transfer may resume after a network failure (default 10)",
}
_METAVARS = {
    "--authfile": "PATH",
    "--creds": "USER[:PASSWORD]",
    "--registry-token": "TOKEN",
    "--cert-dir": "DIR",
    "--shared-blob-dir": "DIR",
    "--blob-cache": "DIR",
    "--blob-cache-max": "SIZE",
    "--config": "FILE",
    "--connect-timeout": "SECONDS",
    "--tls-handshake-timeout": "SECONDS",
    "--response-header-timeout": "SECONDS",
    "--stall-timeout": "SECONDS",
    "--max-resumes": "N",
}
#: skopeo copy's names for the source registry's flags (``--src-tls-verify`` ...), accepted by ``copy`` too
_SOURCE_ALIASES = ("--tls-verify", *CREDENTIAL_FLAGS, "--cert-dir")


def add_proxy_flags(parser: argparse.ArgumentParser, source_aliases: bool = False) -> None:
    """The registry flags of ``image-proxy experimental-image-proxy`` (passed on to the proxy started for the
    command) and ``--proxy-socket``. ``source_aliases``: also under skopeo copy's ``--src-`` names."""
    group = parser.add_argument_group(
        "proxy", "the proxy this command starts (with --proxy-socket, the daemon's own settings apply instead)"
    )
    group.add_argument(
        "--proxy-socket",
        metavar="PATH",
        help="use the image-proxy daemon listening on PATH instead of starting a proxy",
    )

    def names(flag: str) -> list[str]:
        alias = "--src-" + flag[2:]
        return [flag, alias] if source_aliases and flag in _SOURCE_ALIASES else [flag]

    group.add_argument(
        *names("--tls-verify"),
        dest="tls_verify",
        metavar="BOOL",
        nargs="?",
        const="true",
        choices=("true", "false", "1", "0"),
        help="require HTTPS and verified certificates (default true; false for a plain-HTTP registry)",
    )
    for flag, takes_value in SERVE_FLAGS:
        if takes_value:
            metavar = _METAVARS.get(flag, dest(flag).upper())
            group.add_argument(*names(flag), dest=dest(flag), metavar=metavar, help=_HELPS[flag])
        else:
            group.add_argument(*names(flag), dest=dest(flag), action="store_true", help=_HELPS[flag])


def proxy_arguments(args: argparse.Namespace) -> list[str]:
    """The flags for the command's proxy, from the parsed command line (what was given, nothing else)."""
    argv: list[str] = []
    for flag in GLOBAL_FLAGS:
        value = getattr(args, dest(flag), None)
        if value:
            argv += [flag, value]
    for flag in GLOBAL_SWITCHES:
        if getattr(args, dest(flag), False):
            argv.append(flag)
    if getattr(args, "debug", False):
        argv.append("--debug")
    tls_verify = getattr(args, "tls_verify", None)
    if tls_verify is not None:
        argv.append(f"--tls-verify={'false' if tls_verify in ('false', '0') else 'true'}")
    for flag, takes_value in SERVE_FLAGS:
        value = getattr(args, dest(flag), None)
        if takes_value and value is not None:
            argv += [flag, str(value)]
        elif not takes_value and value:
            argv.append(flag)
    return argv


def check_proxy_socket_flags(args: argparse.Namespace) -> str | None:
    """With ``--proxy-socket`` the daemon's settings are used: a registry flag given too would be ignored
    silently, so it is an error; returns its text (None when fine)."""
    if not getattr(args, "proxy_socket", None):
        return None
    given = [flag for flag in proxy_arguments(args) if flag.startswith("--") and flag != "--debug"]
    if given:
        names = ", ".join(sorted({flag.split("=", 1)[0] for flag in given}))
        return (
            f"{names}: these configure a proxy this command would start; with --proxy-socket the daemon's own "
            "settings apply (set them in the daemon's configuration instead)"
        )
    return None


#: serves one client on a connected SOCK_SEQPACKET socket until it closes (the proxy the command starts)
ServeOne = Callable[[socket.socket], Awaitable[None]]
#: how long the command's own proxy may take to end once the command closed its socket, before it is cancelled
SERVER_GRACE = 1.0


@contextlib.asynccontextmanager
async def open_proxy(args: argparse.Namespace, **options: Any) -> AsyncIterator[ImageProxy]:
    """A proxy for the command: the daemon at ``--proxy-socket``; else the command's own proxy, ``args.serve``
    (what ``image-proxy experimental-image-proxy`` with the command's flags runs), served in this process on one
    end of a socketpair while the client bindings speak the protocol on the other. The bytes cross the same
    socket and pipes as with a spawned proxy; what is saved is a second interpreter's start-up and imports
    (about 0.2 s a command)."""
    if getattr(args, "proxy_socket", None):
        async with ImageProxy.connect(args.proxy_socket, **options) as proxy:
            yield proxy
        return
    serve: ServeOne = args.serve
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    # The command's cancellation (Ctrl-C) reaches the proxy only once the client is done with it: the client's
    # last calls on the way out (CloseImage) are answered, as a spawned proxy would, instead of waiting for their
    # own deadlines. Then the proxy has SERVER_GRACE to end after the EOF, and is cancelled.
    server_scope = trio.CancelScope(shield=True)

    async def serve_until_closed() -> None:
        with server_scope:
            await serve(theirs)

    async with failing_fast() as nursery:  # a failure is raised as itself, not in an ExceptionGroup
        try:
            nursery.start_soon(serve_until_closed)
        except BaseException:
            theirs.close()
            ours.close()
            raise
        try:
            async with ImageProxy.connect(ours, **options) as proxy:  # closes ours: the server sees EOF and ends
                yield proxy
        finally:
            server_scope.deadline = trio.current_time() + SERVER_GRACE


_AUTHORITY = re.compile(r"registry (\S+) refused access")
_DOCKER_REF = re.compile(r"docker://([^/\s]+)/")


def hints_for(error: ProxyError | OSError, args: argparse.Namespace) -> list[str]:
    """What a person could try next, for the errors that have a known remedy."""
    text = str(error)
    hints: list[str] = []
    if "refused access" in text:
        where = _AUTHORITY.search(text)
        registry = where.group(1) if where else "the registry"
        if "no credentials were sent" in text:
            hints.append(
                f"log in to {registry} (skopeo login / podman login write an auth file), or pass "
                "--creds USER:PASSWORD or --authfile FILE"
            )
        else:
            hints.append(f"check the credentials for {registry} (--creds, --authfile, or the auth file in use)")
    daemon = bool(getattr(args, "proxy_socket", None))
    if "corrupted blob" in text or re.search(r"expected \d+ bytes in blob", text) or "have digest" in text:
        cache = getattr(args, "blob_cache", None)
        if cache:
            hints.append(f"the blob cache may hold a damaged file: run 'image-proxy cache verify --repair {cache}'")
        elif daemon:
            hints.append(
                "the daemon's blob cache may hold a damaged file: run 'image-proxy cache verify --repair DIR' on "
                "the daemon's cache directory (its [cache] dir), or check any proxy or mirror between it and the "
                "registry"
            )
        else:
            hints.append("the bytes served did not match the digest: check any proxy or mirror between")
    if "--tls-verify=false" in text and daemon:
        hints.append(
            "with --proxy-socket the daemon's settings decide: mark the registry insecure in the daemon's "
            'registries.conf ([[registry]] location="HOST" insecure=true) or start the daemon with '
            "--tls-verify=false; this command's --tls-verify does not apply"
        )
    if re.search(r"MANIFEST_UNKNOWN|NAME_UNKNOWN|manifest unknown|not found", text, re.IGNORECASE):
        hints.append("check the repository name and the tag or digest")
    if re.search(r"connection refused|cannot connect|name or service not known|no route", text, re.IGNORECASE):
        if getattr(args, "proxy_socket", None) and "image proxy at" in text:
            hints.append("is the daemon running? (image-proxy daemon --listen PATH)")
        else:
            match = _DOCKER_REF.search(text)
            host = match.group(1) if match else "the registry"
            hints.append(f"is {host} reachable from here, and is the address right?")
    if isinstance(error, ProxyError) and error.code is ErrorCode.RETRYABLE and not hints:
        hints.append("the failure looks temporary: try again later")
    return hints


def report_error(
    command: str, error: ProxyError | OSError, args: argparse.Namespace, out: Callable[[str], Any]
) -> None:
    """``image-proxy COMMAND: error`` and one ``hint:`` line per remedy."""
    if isinstance(error, OSError) and not isinstance(error, ProxyError):
        where = f"{error.filename}: " if error.filename else ""
        out(f"image-proxy {command}: {where}{error.strerror or error}")
    else:
        out(f"image-proxy {command}: {error}")
    for hint in hints_for(error, args):
        out(f"  hint: {hint}")


#: transports whose reference is a path on this machine
LOCAL_TRANSPORTS = ("oci", "dir", "oci-archive", "docker-archive")


def absolute_local_reference(reference: str) -> str:
    """``oci:relative/dir:tag`` as ``oci:/cwd/relative/dir:tag`` (and dir:, oci-archive:, docker-archive:): a
    daemon resolves paths in its own working directory, not the command's."""
    transport, sep, rest = reference.partition(":")
    if not sep or transport not in LOCAL_TRANSPORTS or rest.startswith("/") or not rest:
        return reference
    return f"{transport}:{os.path.join(os.getcwd(), rest)}"


def short_digest(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}"


def os_error_text(e: OSError) -> str:
    return f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"


__all__ = [
    "ServeOne",
    "absolute_local_reference",
    "add_proxy_flags",
    "check_proxy_socket_flags",
    "hints_for",
    "open_proxy",
    "os_error_text",
    "proxy_arguments",
    "report_error",
    "short_digest",
]
