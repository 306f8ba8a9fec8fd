"""Reading the configuration skopeo reads: registries.conf, auth files and credential helpers, certs.d.

The names below are imported from their modules when first used (PEP 562): importing one module of this package
(``proxy.config.daemon_conf``, ``proxy.config.errors``) does not import the others, so a spawned proxy that only
relays to the daemon does not parse auth files or registries.conf machinery it never uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: each exported name -> the module of this package that defines it
_MODULES = {
    "AuthFile": "auth_files",
    "CredentialSource": "auth_files",
    "auth_file_paths": "auth_files",
    "cert_dirs_for": "certs",
    "run_credential_helper": "cred_helpers",
    "Credentials": "credentials",
    "RegistryToken": "credentials",
    "ConfigError": "errors",
    "AUTH_FILE_HELPER": "registries_conf",
    "ConfigPaths": "registries_conf",
    "Endpoint": "registries_conf",
    "Mirror": "registries_conf",
    "PullSource": "registries_conf",
    "RegistriesConf": "registries_conf",
    "Registry": "registries_conf",
    "load_registries_conf": "registries_conf",
    "match_prefix": "registries_conf",
    "parse_registries_conf": "registries_conf",
    "registries_conf_paths": "registries_conf",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
