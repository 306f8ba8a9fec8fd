"""The flags of ``image-proxy experimental-image-proxy`` that set what a proxy does: credentials, TLS, policy,
platform overrides, caches, deadlines. One list for both of their readers: a client command (``copy``,
``inspect``, ``layers``) passes the ones it was given on to the proxy it starts (``proxy_access``), and a spawned
proxy that would relay to the daemon serves its client itself when one was given, because the daemon applies its
own settings (``proxy.cli.main``). Only the standard library: every spawned proxy imports this."""

from __future__ import annotations

import argparse

#: skopeo's registry credential flags (copy's ``--src-*`` names them too)
CREDENTIAL_FLAGS = ("--authfile", "--creds", "--username", "--password", "--registry-token", "--no-creds")
#: the serving commands' own flags, handed unchanged to a command's proxy: (flag, takes a value)
SERVE_FLAGS: tuple[tuple[str, bool], ...] = (
    ("--authfile", True),
    ("--creds", True),
    ("--username", True),
    ("--password", True),
    ("--registry-token", True),
    ("--no-creds", False),
    ("--cert-dir", True),
    ("--shared-blob-dir", True),
    ("--blob-cache", True),
    ("--blob-cache-max", True),
    ("--config", True),
    ("--connect-timeout", True),
    ("--tls-handshake-timeout", True),
    ("--response-header-timeout", True),
    ("--stall-timeout", True),
    ("--max-resumes", True),
)
#: skopeo's global flags (accepted before or after the subcommand) that the proxy needs too
GLOBAL_FLAGS = (
    "--override-arch",
    "--override-os",
    "--override-variant",
    "--tmpdir",
    "--user-agent-prefix",
    "--registries-conf",
    "--policy",
    "--registries.d",
)
#: skopeo's global switches the proxy needs too
GLOBAL_SWITCHES = ("--insecure-policy", "--require-signed")
TLS_VERIFY = "--tls-verify"
#: where a relay reads its daemon from: the one serve flag that is not a setting the daemon would need
CONFIG = "--config"
#: the flags a relay forwards to the daemon as its connection's settings (extension session-settings,
#: docs/PROTOCOL.md) instead of serving its client itself: the ones update agents pass
SESSION_FLAGS = (*CREDENTIAL_FLAGS, "--user-agent-prefix")


def dest(flag: str) -> str:
    """The argparse destination of ``flag``."""
    return flag.lstrip("-").replace("-", "_").replace(".", "_")


def settings_given(args: argparse.Namespace) -> list[str]:
    """The flags among these (but ``--config``) that ``args`` sets, in this module's order: given on the command
    line, or through the environment (``REGISTRY_AUTH_FILE`` is ``--authfile``'s default). ``--tls-verify=false``
    is given; a switch is given when true."""
    given = [flag for flag, takes_value in SERVE_FLAGS if flag != CONFIG and _set(args, flag, takes_value)]
    if getattr(args, dest(TLS_VERIFY), None) is not None:
        given.append(TLS_VERIFY)
    given += [flag for flag in GLOBAL_FLAGS if _set(args, flag, True)]
    return given + [flag for flag in GLOBAL_SWITCHES if _set(args, flag, False)]


def _set(args: argparse.Namespace, flag: str, takes_value: bool) -> bool:
    value = getattr(args, dest(flag), None)
    return value is not None if takes_value else bool(value)


__all__ = [
    "CONFIG",
    "CREDENTIAL_FLAGS",
    "GLOBAL_FLAGS",
    "GLOBAL_SWITCHES",
    "SERVE_FLAGS",
    "SESSION_FLAGS",
    "TLS_VERIFY",
    "dest",
    "settings_given",
]
