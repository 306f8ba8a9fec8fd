"""Registry credentials the way skopeo finds them: its flags, then containers-auth.json(5) files and helpers.

Behaviour follows containers/image ``pkg/docker/config/config.go`` (``getCredentialsWithHomeDir``,
``getAuthFilePaths``, ``getPathToAuthWithOS``, ``findCredentialsInFile``, ``authKeyLookupOrder``,
``normalizeAuthFileKey``) and skopeo's option checks (``cmd/skopeo/utils.go``):

1. ``--registry-token``, then ``--creds``/``--username``+``--password``/``--no-creds``. They are meant for the
   reference the user named: for another host (a mirror) they are ignored and the files are consulted, as
   ``newImageSourceAttempt`` does.
2. The registries.conf ``credential-helpers`` in order (default ``containers-auth.json``, meaning the files); the first
   that has credentials wins, errors are reported only if none has any.
3. The files: ``--authfile``/``$REGISTRY_AUTH_FILE`` alone when given; else ``$XDG_RUNTIME_DIR/containers/auth.json``
   (``/run/containers/<uid>/auth.json`` without XDG_RUNTIME_DIR; skipped with a warning if XDG_RUNTIME_DIR does not
   exist), ``${XDG_CONFIG_HOME:-$HOME/.config}/containers/auth.json``, ``$DOCKER_CONFIG/config.json`` or
   ``$HOME/.docker/config.json``, and ``$HOME/.dockercfg`` (legacy format). In each file: a ``credHelpers`` entry for
   the host, else the most specific ``auths`` key (``host/ns/repo``, ``host/ns``, ``host``), else a key that
   normalises to the host (``https://host/...``; ``docker.io``, ``registry-1.docker.io`` and
   ``https://index.docker.io/v1/`` are one registry).

Docker's ``credsStore`` is *not* read by containers/image (containers/image#111, skopeo#1083); it is supported here
only when ``docker_creds_store=True``.

Lookups can run helper programs, so they block: from trio, call :meth:`CredentialSource.lookup` in a thread.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from proxy.common import jsonlimits

from ._env import home_dir, under_root
from .cred_helpers import DEFAULT_HELPER_TIMEOUT, run_credential_helper
from .credentials import Credentials, RegistryToken
from .errors import ConfigError
from .registries_conf import AUTH_FILE_HELPER

log = logging.getLogger(__name__)

ENV_AUTH_FILE = "REGISTRY_AUTH_FILE"
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})

Lookup = Credentials | RegistryToken | None


@attrs.frozen
class AuthFile:
    """One file to search; ``legacy`` is the ``~/.dockercfg`` format (a bare map of ``auths``). ``content``: the
    file as a daemon's client read it (``SetSessionSettings``), never read from ``path`` (which only names it; empty:
    the client's file does not exist). Such a file's credential helpers are never run: they would run as the daemon,
    with its secrets."""

    path: Path
    legacy: bool = False
    content: bytes | None = attrs.field(default=None, repr=False)


def auth_file_paths(
    authfile: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    root: Path = Path("/"),
) -> list[AuthFile]:
    """The files to search in order (``getAuthFilePaths``); some may not exist."""
    if authfile is not None and os.fspath(authfile) != "":
        return [AuthFile(Path(authfile))]
    home = home_dir(environ)
    files: list[AuthFile] = []
    runtime_dir = environ.get("XDG_RUNTIME_DIR", "")
    if runtime_dir:
        if Path(runtime_dir).exists():
            files.append(AuthFile(Path(runtime_dir) / "containers/auth.json"))
        else:
            log.warning(
                "%r directory set by $XDG_RUNTIME_DIR does not exist. Either create the directory or unset"
                " $XDG_RUNTIME_DIR.: trying to pull in the event that the image is public",
                runtime_dir,
            )
    else:
        files.append(AuthFile(under_root(root, f"/run/containers/{os.getuid()}/auth.json")))
    config_home = environ.get("XDG_CONFIG_HOME", "") or str(home / ".config")
    files.append(AuthFile(Path(config_home) / "containers/auth.json"))
    docker_config = environ.get("DOCKER_CONFIG", "")
    files.append(AuthFile(Path(docker_config) / "config.json" if docker_config else home / ".docker/config.json"))
    files.append(AuthFile(home / ".dockercfg", legacy=True))
    return files


def normalize_registry(registry: str) -> str:
    """``normalizeRegistry``: the Docker Hub host names all become ``index.docker.io``."""
    return "index.docker.io" if registry in ("registry-1.docker.io", "docker.io") else registry


def normalize_auth_file_key(key: str, legacy: bool) -> str:
    """``normalizeAuthFileKey``: a URL key (or any legacy key) becomes its host, then :func:`normalize_registry`."""
    stripped = key.removeprefix("http://").removeprefix("https://")
    if legacy or stripped != key:
        stripped = stripped.split("/", 1)[0]
    return normalize_registry(stripped)


def auth_key_lookup_order(key: str, registry: str, legacy: bool) -> Iterator[str]:
    """``authKeyLookupOrder``: ``quay.io/ns/repo``, ``quay.io/ns``, ``quay.io`` (legacy files: the host only)."""
    if legacy:
        yield registry
        return
    while True:
        yield key
        key, slash, _ = key.rpartition("/")
        if not slash:
            return


@attrs.frozen
class _FileContents:
    auths: dict[str, Mapping[str, Any]]
    cred_helpers: dict[str, str]
    creds_store: str


def _read_auth_file(auth_file: AuthFile) -> _FileContents:
    path = auth_file.path
    if auth_file.content is not None:
        raw = auth_file.content
        if not raw:
            return _FileContents({}, {}, "")
    else:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return _FileContents({}, {}, "")
        except OSError as e:
            raise ConfigError(f'reading JSON file "{path}": {e.strerror or e}', path) from e
    try:
        document = jsonlimits.loads(raw)
    except jsonlimits.NestingError as e:
        raise ConfigError(f'reading JSON file "{path}": {e}', path) from None
    except ValueError as e:
        raise ConfigError(f'reading JSON file "{path}": invalid JSON: {_json_error(e)}', path) from None
    if auth_file.legacy:
        auths, helpers, store = document, {}, ""
    else:
        if not isinstance(document, dict):
            raise ConfigError(f'reading JSON file "{path}": the top level must be an object', path)
        # JSON null is "absent", as for Go's json.Unmarshal into a map.
        auths = _or_default(document.get("auths"), {})
        helpers = _or_default(document.get("credHelpers"), {})
        store = _or_default(document.get("credsStore"), "")
    if not isinstance(auths, dict) or not all(isinstance(v, dict) for v in auths.values()):
        raise ConfigError(f'reading JSON file "{path}": "auths" must map registries to objects', path)
    if not isinstance(helpers, dict) or not all(isinstance(v, str) for v in helpers.values()):
        raise ConfigError(f'reading JSON file "{path}": "credHelpers" must map registries to helper names', path)
    if not isinstance(store, str):
        raise ConfigError(f'reading JSON file "{path}": "credsStore" must be a string', path)
    return _FileContents(auths, helpers, store)


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _json_error(e: ValueError) -> str:
    # json.JSONDecodeError's message quotes no document text, only a position.
    return str(e) if isinstance(e, json.JSONDecodeError) else type(e).__name__


def _decode_entry(path: Path, key: str, entry: Mapping[str, Any]) -> Credentials | None:
    """``decodeDockerAuth``: ``auth`` is base64 ``user:password``; an entry without a ``:`` is skipped."""
    auth = entry.get("auth", "")
    token = entry.get("identitytoken", "")
    if not isinstance(auth, str) or not isinstance(token, str):
        raise ConfigError(f'reading JSON file "{path}": "auth" and "identitytoken" of {key!r} must be strings', path)
    try:
        decoded = base64.b64decode(auth, validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        raise ConfigError(
            f'reading JSON file "{path}": the "auth" field of {key!r} is not valid base64', path
        ) from None
    username, colon, password = decoded.partition(":")
    if not colon:
        if decoded:
            log.warning('Error parsing the "auth" field of a credential entry %r in %r, missing semicolon', key, path)
        return None
    password = password.strip("\x00")
    if not username and not password and not token:
        return None  # an empty DockerAuthConfig is "not found" in c/image: the search goes on
    return Credentials(username, password, identity_token=token or None)


@attrs.frozen(eq=False)
class CredentialSource:
    """Where credentials come from for one run of the proxy. Build it with :meth:`from_options`."""

    explicit: Credentials | None = None
    no_creds: bool = False
    registry_token: RegistryToken | None = None
    auth_files: tuple[AuthFile, ...] = ()
    credential_helpers: tuple[str, ...] = (AUTH_FILE_HELPER,)
    docker_creds_store: bool = False
    environ: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    helper_timeout: float = DEFAULT_HELPER_TIMEOUT

    @classmethod
    def from_options(
        cls,
        authfile: str | os.PathLike[str] | None = None,
        creds: str | None = None,
        username: str | None = None,
        password: str | None = None,
        registry_token: str | None = None,
        no_creds: bool = False,
        *,
        credential_helpers: Sequence[str] = (AUTH_FILE_HELPER,),
        docker_creds_store: bool = False,
        helper_timeout: float = DEFAULT_HELPER_TIMEOUT,
        environ: Mapping[str, str] = os.environ,
        root: Path = Path("/"),
    ) -> CredentialSource:
        """From skopeo's options (None = not given). ``authfile`` defaults to ``$REGISTRY_AUTH_FILE`` as skopeo's
        flag does; ``credential_helpers`` is :attr:`RegistriesConf.credential_helpers`."""
        explicit = _explicit_credentials(creds, username, password, no_creds)
        if authfile is None:
            authfile = environ.get(ENV_AUTH_FILE) or None
        return cls(
            explicit=explicit,
            no_creds=no_creds,
            registry_token=RegistryToken(registry_token) if registry_token else None,
            auth_files=tuple(auth_file_paths(authfile, environ=environ, root=root)),
            credential_helpers=tuple(credential_helpers) or (AUTH_FILE_HELPER,),
            docker_creds_store=docker_creds_store,
            environ=dict(environ),
            helper_timeout=helper_timeout,
        )

    @classmethod
    def of_client(
        cls,
        auth_file: str | None = None,
        auth_file_name: str | None = None,
        creds: str | None = None,
        username: str | None = None,
        password: str | None = None,
        registry_token: str | None = None,
        no_creds: bool = False,
    ) -> CredentialSource:
        """The credentials a daemon's client brought (``SetSessionSettings``): its flags and the content of its auth
        file, nothing of this process's (no default auth files, no helpers, no environment). An auth file that
        cannot be used, or names credential helpers, is refused now (ConfigError naming it)."""
        explicit = _explicit_credentials(creds, username, password, no_creds)
        files: tuple[AuthFile, ...] = ()
        if auth_file is not None:
            name = Path(auth_file_name or "the client's auth file")
            file = AuthFile(name, content=auth_file.encode("utf-8"))
            contents = _read_auth_file(file)
            if contents.cred_helpers or contents.creds_store:
                raise ConfigError(
                    f'auth file "{name}" names credential helpers (credHelpers or credsStore), which the daemon does'
                    " not run for its clients (they would run as the daemon); serve this client with its own proxy",
                    name,
                )
            for key, entry in contents.auths.items():
                _decode_entry(name, key, entry)  # a malformed entry is an error now, not at the first pull
            files = (file,)
        return cls(
            explicit=explicit,
            no_creds=no_creds,
            registry_token=RegistryToken(registry_token) if registry_token else None,
            auth_files=files,
            credential_helpers=(AUTH_FILE_HELPER,),
        )

    def lookup(self, registry_host: str, repository: str = "", *, logical_host: str | None = None) -> Lookup:
        """Credentials for ``registry_host/repository`` (None: anonymous).

        ``logical_host`` is the host of the reference the user asked for; when it differs from ``registry_host``
        (a mirror, or a location rewrite to another host), the command-line credentials are not used for it.
        Credentials found for one host are never returned for another (only the Docker Hub aliases are one host).
        """
        if "/" in registry_host or not registry_host:
            raise ConfigError(f"invalid registry host {registry_host!r}")
        own_host = logical_host is None or logical_host == registry_host
        if own_host and self.registry_token is not None:
            return self.registry_token
        if own_host and (self.explicit is not None or self.no_creds):
            return self.explicit
        key = f"{registry_host}/{repository}" if repository else registry_host
        errors: list[str] = []
        for helper in self.credential_helpers:
            try:
                if helper == AUTH_FILE_HELPER:
                    found = self._lookup_in_files(key, registry_host)
                else:
                    found = self._run_helper(helper, registry_host)
            except ConfigError as e:
                errors.append(str(e))
                continue
            if found is not None:
                return found
        if errors:
            raise ConfigError("errors looking up credentials:\n\t* " + "\n\t* ".join(errors))
        return None

    def _run_helper(self, name: str, server: str) -> Credentials | None:
        return run_credential_helper(name, server, environ=self.environ, timeout=self.helper_timeout)

    def _lookup_in_files(self, key: str, registry: str) -> Credentials | None:
        for auth_file in self.auth_files:
            found = self._lookup_in_file(key, registry, auth_file)
            if found is not None:
                return found
        return None

    def _lookup_in_file(self, key: str, registry: str, auth_file: AuthFile) -> Credentials | None:
        """``findCredentialsInFile`` (+ ``credsStore`` when enabled)."""
        contents = _read_auth_file(auth_file)
        if auth_file.content is not None:  # a client's file: its helpers would run as this process
            return _find_entry(key, registry, auth_file, contents.auths)
        if registry in contents.cred_helpers:
            return self._run_helper(contents.cred_helpers[registry], registry)
        found = _find_entry(key, registry, auth_file, contents.auths)
        if found is not None:
            return found
        # An empty entry is what Docker writes when the secret is in its credsStore.
        if self.docker_creds_store and contents.creds_store:
            server = DOCKER_HUB_KEY if registry in _DOCKER_HUB_ALIASES else registry
            return self._run_helper(contents.creds_store, server)
        return None


def _find_entry(
    key: str, registry: str, auth_file: AuthFile, entries: Mapping[str, Mapping[str, Any]]
) -> Credentials | None:
    """The most specific exact key, else the first key that normalises to the registry; an unusable entry counts as
    none (c/image then goes on to the next file)."""
    for candidate in auth_key_lookup_order(key, registry, auth_file.legacy):
        if candidate in entries:
            return _decode_entry(auth_file.path, candidate, entries[candidate])
    normalized = normalize_registry(registry)
    for file_key, entry in entries.items():
        if normalize_auth_file_key(file_key, auth_file.legacy) == normalized:
            return _decode_entry(auth_file.path, file_key, entry)
    return None


def _explicit_credentials(
    creds: str | None, username: str | None, password: str | None, no_creds: bool
) -> Credentials | None:
    """skopeo ``validateCredentials`` + ``setAuthConfig`` + ``parseCreds``."""
    if creds is not None and no_creds:
        raise ConfigError("creds and no-creds cannot be specified at the same time")
    if username is not None and no_creds:
        raise ConfigError("username and no-creds cannot be specified at the same time")
    if creds is not None and username is not None:
        raise ConfigError("creds and username cannot be specified at the same time")
    if (username is None) != (password is None):
        if username is not None:
            raise ConfigError("password must be specified when username is specified")
        raise ConfigError("username must be specified when password is specified")
    if creds is not None:
        if creds == "":
            raise ConfigError("credentials can't be empty")
        user, _, secret = creds.partition(":")
        if user == "":
            raise ConfigError("username can't be empty")
        return Credentials(user, secret)
    if username is not None and password is not None:
        return Credentials(username, password)
    return None
