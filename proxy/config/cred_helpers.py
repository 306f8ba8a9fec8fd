"""Running ``docker-credential-<name> get`` (the docker-credential-helpers protocol).

The helper reads the server name on stdin and prints ``{"ServerURL", "Username", "Secret"}``; a failure is a non-zero
exit with a message on stdout, where ``credentials not found in native keychain`` means "nothing stored" rather than an
error. A ``Username`` of ``<token>`` means the secret is an identity (refresh) token. Secrets never appear in errors.

This blocks (a subprocess with a timeout): from trio, call it through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

from proxy.common import jsonlimits

from .credentials import Credentials
from .errors import ConfigError

HELPER_PREFIX = "docker-credential-"
NOT_FOUND_MESSAGE = "credentials not found in native keychain"
TOKEN_USERNAME = "<token>"
DEFAULT_HELPER_TIMEOUT = 30.0
_MAX_MESSAGE = 200


def run_credential_helper(
    name: str,
    server: str,
    *,
    environ: Mapping[str, str] = os.environ,
    timeout: float = DEFAULT_HELPER_TIMEOUT,
) -> Credentials | None:
    """Credentials for ``server`` from ``docker-credential-<name>`` found on ``environ["PATH"]``; None when the
    helper has nothing for it. A missing helper, a failure, a timeout or bad output is a ConfigError naming the
    helper and the server."""
    program = HELPER_PREFIX + name
    where = f"credential helper {program} for {server}"
    if os.sep in name or not name:
        raise ConfigError(f"{where}: invalid helper name {name!r}")
    executable = shutil.which(program, path=environ.get("PATH", os.defpath))
    if executable is None:
        raise ConfigError(f"{where}: {program} not found in $PATH")
    try:
        done = subprocess.run(
            [executable, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=timeout,
            env=dict(environ),
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ConfigError(f"{where}: no answer after {timeout:g} s") from e
    except OSError as e:
        raise ConfigError(f"{where}: cannot run {executable}: {e.strerror or e}") from e
    out = done.stdout.decode("utf-8", "replace").strip()
    if done.returncode != 0:
        if out == NOT_FOUND_MESSAGE:
            return None
        message = out.splitlines()[0][:_MAX_MESSAGE] if out else done.stderr.decode("utf-8", "replace").strip()
        raise ConfigError(f"{where}: exit status {done.returncode}: {message[:_MAX_MESSAGE]}")
    try:
        answer = jsonlimits.loads(out)
    except ValueError:
        raise ConfigError(f"{where}: the output is not JSON") from None
    if not isinstance(answer, dict):
        raise ConfigError(f"{where}: the output is not a JSON object")
    username = answer.get("Username", "")
    secret = answer.get("Secret", "")
    if not isinstance(username, str) or not isinstance(secret, str):
        raise ConfigError(f"{where}: Username and Secret must be strings")
    if username == TOKEN_USERNAME:
        return Credentials("", "", identity_token=secret) if secret else None
    if not username and not secret:
        return None
    return Credentials(username, secret)
