"""Reading the configuration skopeo reads: registries.conf, auth files and credential helpers, certs.d."""

from __future__ import annotations

from .auth_files import AuthFile, CredentialSource, auth_file_paths
from .certs import cert_dirs_for
from .cred_helpers import run_credential_helper
from .credentials import Credentials, RegistryToken
from .errors import ConfigError
from .registries_conf import (
    AUTH_FILE_HELPER,
    ConfigPaths,
    Endpoint,
    Mirror,
    PullSource,
    RegistriesConf,
    Registry,
    load_registries_conf,
    match_prefix,
    parse_registries_conf,
    registries_conf_paths,
)

__all__ = [
    "AUTH_FILE_HELPER",
    "AuthFile",
    "ConfigError",
    "ConfigPaths",
    "CredentialSource",
    "Credentials",
    "Endpoint",
    "Mirror",
    "PullSource",
    "RegistriesConf",
    "Registry",
    "RegistryToken",
    "auth_file_paths",
    "cert_dirs_for",
    "load_registries_conf",
    "match_prefix",
    "parse_registries_conf",
    "registries_conf_paths",
    "run_credential_helper",
]
