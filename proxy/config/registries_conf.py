"""containers-registries.conf(5): which registry a reference belongs to, its mirrors, and whether it is blocked.

Behaviour follows containers/image ``pkg/sysregistriesv2/system_registries_v2.go``:

- Which files: an explicit path (skopeo ``--registries-conf``; ``CONTAINERS_REGISTRIES_CONF``, which podman and
  buildah honour through containers/common but skopeo itself does not read) must exist;
  otherwise ``$HOME/.config/containers/registries.conf`` when it exists, else ``/etc/containers/registries.conf``
  (missing is fine). Drop-ins (``*.conf``, lexical order, no recursion) come from ``/etc/containers/registries.conf.d``
  then ``$HOME/.config/containers/registries.conf.d`` -- except that when the *user* file is the main file, only the
  user directory is read. The directories do not depend on where an explicit file lives.
- Merging: a drop-in's ``[[registry]]`` tables replace earlier ones with the same prefix; its top-level keys replace
  earlier values when present. Within one file the first table with a given prefix wins. Registries are kept sorted by
  prefix, and :meth:`RegistriesConf.find_registry` takes the first *strictly* longest prefix in that order.
- The v1 format (``[registries.search]``...) is converted as c/image converts it (main file only; drop-ins must be v2).
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, cast

import attrs

from proxy.common import jsonlimits
from proxy.image.reference import _DOMAIN, DockerReference, parse_docker_reference

from ._env import home_dir, under_root
from .errors import ConfigError

PullFromMirror = Literal["all", "digest-only", "tag-only"]
ShortNameMode = Literal["disabled", "enforcing", "permissive"]

MIRROR_ALL: Final = "all"
MIRROR_DIGEST_ONLY: Final = "digest-only"
MIRROR_TAG_ONLY: Final = "tag-only"
AUTH_FILE_HELPER: Final = "containers-auth.json"
"""The reserved ``credential-helpers`` entry meaning "read the auth files" (containers-auth.json(5))."""
DEFAULT_SHORT_NAME_MODE: Final = "permissive"

SYSTEM_REGISTRIES_CONF: Final = "/etc/containers/registries.conf"
SYSTEM_REGISTRIES_CONF_DIR: Final = "/etc/containers/registries.conf.d"
USER_REGISTRIES_CONF: Final = ".config/containers/registries.conf"
USER_REGISTRIES_CONF_DIR: Final = ".config/containers/registries.conf.d"
ENV_REGISTRIES_CONF: Final = "CONTAINERS_REGISTRIES_CONF"

_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
_SHORT_NAME_MODES = ("disabled", "enforcing", "permissive")
_ANCHORED_DOMAIN = re.compile(_DOMAIN, re.ASCII)
_V2_KEYS = (
    "registry",
    "unqualified-search-registries",
    "credential-helpers",
    "short-name-mode",
    "additional-layer-store-auth-helper",
    "aliases",
)

log = logging.getLogger(__name__)


@attrs.frozen
class Endpoint:
    """Where to reach (part of) a registry: ``location`` is ``host[:port][/namespace...]``; ``insecure`` allows
    plain HTTP and skips certificate verification; ``proxy`` is the per-registry forwarding proxy URL."""

    location: str
    insecure: bool = False
    proxy: str | None = None


@attrs.frozen
class Mirror(Endpoint):
    """A ``[[registry.mirror]]`` table."""

    pull_from_mirror: PullFromMirror = MIRROR_ALL


@attrs.frozen
class Registry:
    """A ``[[registry]]`` table after normalisation (``prefix`` defaults to ``location``; trailing ``/`` removed).
    ``location`` is ``""`` only for a ``*.example.com`` prefix, meaning "no rewrite"."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()
    proxy: str | None = None

    @property
    def endpoint(self) -> Endpoint:
        """The primary (non-mirror) endpoint."""
        return Endpoint(self.location, self.insecure, self.proxy)


@attrs.frozen
class PullSource:
    """One place to try for a reference: ``reference`` is rewritten for ``endpoint`` (its location replaces the
    matched prefix), so it names the physical repository on that host."""

    endpoint: Endpoint
    reference: DockerReference
    is_mirror: bool


def match_prefix(ref: str, prefix: str) -> int:
    """``refMatchingPrefix``: the length of ``ref`` covered by ``prefix``, or -1 when it does not match.

    ``ref`` is ``host[:port]``, a repository name, or a full reference; it matches when it equals ``prefix`` or
    continues after it with ``:``, ``/`` or ``@`` (so, as in c/image, ``example.com`` also matches
    ``example.com:5000``). ``*.example.com`` matches any subdomain of example.com in the host part.
    """
    if prefix.startswith("*."):
        return _match_wildcard(ref, prefix)
    if ref == prefix:
        return len(prefix)
    if len(ref) > len(prefix) and ref.startswith(prefix) and ref[len(prefix)] in ":/@":
        return len(prefix)
    return -1


def _match_wildcard(ref: str, prefix: str) -> int:
    suffix = prefix[1:]  # ".example.com"
    index = ref.find(suffix)  # the first occurrence only, as strings.Index
    if index == -1 or "/" in ref[:index]:
        return -1
    end = index + len(suffix)
    if end == len(ref) or ref[end] in ":/@":
        return end
    return -1


@attrs.frozen
class RegistriesConf:
    """The merged configuration. Build it with :func:`load_registries_conf` (or :meth:`empty`)."""

    registries: tuple[Registry, ...] = ()
    unqualified_search_registries: tuple[str, ...] = ()
    short_name_mode: ShortNameMode = DEFAULT_SHORT_NAME_MODE
    credential_helpers: tuple[str, ...] = (AUTH_FILE_HELPER,)
    additional_layer_store_auth_helper: str = ""
    sources: tuple[Path, ...] = ()
    """The files that were read, in order."""
    description: str = ""
    """The main file and drop-in directories, for messages (``ConfigurationSourceDescription``)."""

    @classmethod
    def empty(cls) -> RegistriesConf:
        return cls()

    def find_registry(self, ref_name: str) -> Registry | None:
        """The registry with the longest matching prefix for ``ref_name`` (a host, repository name or reference
        that starts with an explicit host), or None."""
        found: Registry | None = None
        for registry in self.registries:
            if match_prefix(ref_name, registry.prefix) != -1 and len(registry.prefix) > (
                len(found.prefix) if found else 0
            ):
                found = registry
        return found

    def blocked_error(self, registry: Registry) -> ConfigError:
        where = self.description or "registries.conf"
        return ConfigError(f"registry {registry.prefix} is blocked in registries.conf ({where})")

    def check_not_blocked(self, ref_name: str) -> None:
        """Raise ConfigError if the registry configured for ``ref_name`` is blocked (``newDockerClient``)."""
        registry = self.find_registry(ref_name)
        if registry is not None and registry.blocked:
            raise self.blocked_error(registry)

    def pull_sources(self, ref: DockerReference) -> list[PullSource]:
        """The endpoints to try for ``ref``, in order: the usable mirrors, then the primary
        (``PullSourcesFromReference``).

        A mirror is skipped for a tag reference when it is ``digest-only`` (or the registry is
        ``mirror-by-digest-only``), and for a digest reference when it is ``tag-only``. As in c/image, "blocked" is
        decided per endpoint, by the registry configured for the *rewritten* name: a blocked registry's mirrors are
        still used (this is how "never contact the source" set-ups work), and blocked endpoints are left out. When
        every endpoint is blocked, ConfigError says so.
        """
        registry = self.find_registry(ref.name)
        if registry is None:
            return [PullSource(Endpoint(str(ref)), ref, is_mirror=False)]
        digested = ref.digest is not None
        mirrors: list[Mirror] = []
        if registry.mirror_by_digest_only:
            if digested:
                mirrors.extend(registry.mirrors)
        else:
            for mirror in registry.mirrors:
                if mirror.pull_from_mirror == MIRROR_DIGEST_ONLY and not digested:
                    continue
                if mirror.pull_from_mirror == MIRROR_TAG_ONLY and digested:
                    continue
                mirrors.append(mirror)
        candidates = [(m, True) for m in mirrors] + [(registry.endpoint, False)]
        sources: list[PullSource] = []
        first_blocked: Registry | None = None
        for endpoint, is_mirror in candidates:
            rewritten = self._rewrite(ref, registry.prefix, endpoint.location)
            physical = self.find_registry(rewritten.name)
            if physical is not None and physical.blocked:
                first_blocked = first_blocked or physical
                continue
            sources.append(PullSource(endpoint, rewritten, is_mirror))
        if not sources:
            assert first_blocked is not None
            raise self.blocked_error(first_blocked)
        return sources

    def _rewrite(self, ref: DockerReference, prefix: str, location: str) -> DockerReference:
        """``Endpoint.rewriteReference``: ``location`` replaces the part of ``ref`` that ``prefix`` matched."""
        text = str(ref)
        matched = match_prefix(text, prefix)
        if matched == -1:
            raise ConfigError(f"invalid prefix '{prefix}' for reference '{text}'")
        if location == "":
            return ref
        new_text = location + text[matched:]
        try:
            rewritten = parse_docker_reference(new_text)
        except ValueError as e:
            raise ConfigError(f"rewriting reference {text} to {new_text}: {e} ({self.description})") from e
        if str(rewritten) != new_text:
            raise ConfigError(
                f"rewriting reference {text} to {new_text}: repository name must be canonical ({self.description})"
            )
        return rewritten


# ---------------------------------------------------------------------------------------------------------------------
# Finding and reading the files


@attrs.frozen
class ConfigPaths:
    """Which files to read (``configWrapper``)."""

    main: Path
    explicit: bool
    drop_in_dirs: tuple[Path, ...]

    @property
    def description(self) -> str:
        return ", ".join(str(p) for p in (self.main, *self.drop_in_dirs))


def registries_conf_paths(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    root: Path = Path("/"),
) -> ConfigPaths:
    """The main file and drop-in directories, as ``newConfigWrapperWithHomeDir`` chooses them."""
    home = home_dir(environ)
    user_file = home / USER_REGISTRIES_CONF
    user_dir = home / USER_REGISTRIES_CONF_DIR
    system_dir = under_root(root, SYSTEM_REGISTRIES_CONF_DIR)
    if path is None or os.fspath(path) == "":
        path = environ.get(ENV_REGISTRIES_CONF) or None
    if path is not None:
        return ConfigPaths(Path(path), True, (system_dir, user_dir))
    # as Go's os.Stat: a home this process cannot search (a proxy an agent runs as another user, HOME left as it
    # was) holds no file for it
    if os.path.exists(user_file):
        return ConfigPaths(user_file, False, (user_dir,))
    return ConfigPaths(under_root(root, SYSTEM_REGISTRIES_CONF), False, (system_dir, user_dir))


def load_registries_conf(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    root: Path = Path("/"),
) -> RegistriesConf:
    """Read and merge registries.conf and its drop-ins. ``path`` is the ``--registries-conf`` value (None: use
    ``CONTAINERS_REGISTRIES_CONF`` or the defaults)."""
    paths = registries_conf_paths(path, environ=environ, root=root)
    merged = _Merged()
    sources: list[Path] = []
    try:
        text = paths.main.read_bytes()
    except FileNotFoundError as e:
        if paths.explicit:
            raise ConfigError(
                f'loading registries configuration "{paths.main}": file does not exist', paths.main
            ) from e
    except OSError as e:
        raise ConfigError(f'loading registries configuration "{paths.main}": {e.strerror or e}', paths.main) from e
    else:
        merged.update(_parse_file(text, paths.main, drop_in=False))
        sources.append(paths.main)
    for drop_in in _drop_in_files(paths.drop_in_dirs):
        try:
            text = drop_in.read_bytes()
        except FileNotFoundError:
            continue  # removed since the directory was listed
        except OSError as e:
            raise ConfigError(
                f'loading drop-in registries configuration "{drop_in}": {e.strerror or e}', drop_in
            ) from e
        merged.update(_parse_file(text, drop_in, drop_in=True))
        sources.append(drop_in)
    return merged.build(tuple(sources), paths.description)


def _drop_in_files(dirs: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for directory in dirs:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        except PermissionError as e:
            if not os.access(directory.parent, os.X_OK):
                # the directory cannot even be reached (another user's home): for this process it does not exist
                log.debug("registries.conf.d %s: %s; skipped", directory, e.strerror)
                continue
            raise ConfigError(f"reading registries.conf.d {directory}: {e.strerror or e}", directory) from e
        except OSError as e:
            raise ConfigError(f"reading registries.conf.d {directory}: {e.strerror or e}", directory) from e
        files.extend(Path(e.path) for e in entries if e.name.endswith(".conf") and not e.is_dir())
    return files


@attrs.define
class _Merged:
    """``parsedConfig.updateWithConfigurationFrom``."""

    registries: dict[str, Registry] = attrs.Factory(dict)
    unqualified_search_registries: list[str] = attrs.Factory(list)
    credential_helpers: list[str] = attrs.Factory(list)
    short_name_mode: ShortNameMode | None = None
    additional_layer_store_auth_helper: str = ""

    def update(self, parsed: _ParsedFile) -> None:
        for registry in parsed.registries:
            self.registries[registry.prefix] = registry
        if parsed.unqualified_search_registries is not None:
            self.unqualified_search_registries = parsed.unqualified_search_registries
        if parsed.credential_helpers is not None:
            self.credential_helpers = parsed.credential_helpers
        if parsed.short_name_mode is not None:
            self.short_name_mode = parsed.short_name_mode
        if parsed.additional_layer_store_auth_helper:
            self.additional_layer_store_auth_helper = parsed.additional_layer_store_auth_helper

    def build(self, sources: tuple[Path, ...], description: str) -> RegistriesConf:
        return RegistriesConf(
            registries=tuple(self.registries[prefix] for prefix in sorted(self.registries)),
            unqualified_search_registries=tuple(self.unqualified_search_registries),
            short_name_mode=self.short_name_mode or DEFAULT_SHORT_NAME_MODE,
            credential_helpers=tuple(self.credential_helpers or (AUTH_FILE_HELPER,)),
            additional_layer_store_auth_helper=self.additional_layer_store_auth_helper,
            sources=sources,
            description=description,
        )


@attrs.frozen
class _ParsedFile:
    registries: list[Registry]
    unqualified_search_registries: list[str] | None
    credential_helpers: list[str] | None
    short_name_mode: ShortNameMode | None
    additional_layer_store_auth_helper: str


class _FileReader:
    """Typed access to one decoded TOML document, with errors that name the file."""

    def __init__(self, path: Path, drop_in: bool) -> None:
        self.path = path
        kind = "drop-in registries configuration" if drop_in else "registries configuration"
        self.prefix = f'loading {kind} "{path}"'

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.prefix}: {message}", self.path)

    def string(self, table: Mapping[str, Any], key: str, where: str) -> str:
        value = table.get(key, "")
        if not isinstance(value, str):
            raise self.error(f"{where}{key} must be a string, not {_toml_type(value)}")
        return value

    def boolean(self, table: Mapping[str, Any], key: str, where: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise self.error(f"{where}{key} must be a boolean, not {_toml_type(value)}")
        return value

    def strings(self, table: Mapping[str, Any], key: str, where: str) -> list[str] | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{where}{key} must be an array of strings")
        return list(value)

    def tables(self, table: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(f"{where}{key} must be an array of tables ([[{where}{key}]])")
        return value


def _toml_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}.get(
        type(value), "a table"
    )


def parse_registries_conf(text: str | bytes, path: str | os.PathLike[str] = "<registries.conf>") -> RegistriesConf:
    """One file on its own (no drop-ins), for tests and tools."""
    merged = _Merged()
    merged.update(_parse_file(text.encode() if isinstance(text, str) else text, Path(path), drop_in=False))
    return merged.build((Path(path),), str(path))


def _parse_file(raw: bytes, path: Path, *, drop_in: bool) -> _ParsedFile:
    """``loadConfigFile``: decode, convert v1, validate (``postProcessRegistries``)."""
    reader = _FileReader(path, drop_in)
    try:
        document = jsonlimits.toml_loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise reader.error(f"not UTF-8: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise reader.error(f"invalid TOML: {e}") from e
    except jsonlimits.NestingError as e:
        raise reader.error(str(e)) from None

    v1 = _v1_lists(document, reader)
    if v1 is not None:
        if drop_in:
            raise reader.error("registry must be in v2 format but is in v1")
        if any(key in document and document[key] not in ("", None) for key in _V2_KEYS):
            raise reader.error("mixing sysregistry v1/v2 is not supported")
        return _convert_v1(v1, reader)

    registries = [_parse_registry(t, reader) for t in reader.tables(document, "registry", "")]
    _check_conflicts(registries, reader)
    unique: dict[str, Registry] = {}
    for registry in registries:
        unique.setdefault(registry.prefix, registry)  # the first one with a prefix wins

    mode = reader.string(document, "short-name-mode", "")
    if mode and mode not in _SHORT_NAME_MODES:
        raise reader.error(f"invalid short-name mode: {mode!r}")

    return _ParsedFile(
        registries=list(unique.values()),
        unqualified_search_registries=_parse_search(
            reader.strings(document, "unqualified-search-registries", ""), reader
        ),
        credential_helpers=reader.strings(document, "credential-helpers", ""),
        short_name_mode=cast(ShortNameMode, mode) if mode else None,
        additional_layer_store_auth_helper=reader.string(document, "additional-layer-store-auth-helper", ""),
    )


def _parse_location(value: str, reader: _FileReader) -> str:
    """``parseLocation``: trailing slashes removed; URL schemes refused."""
    trimmed = value.rstrip("/")
    if trimmed.startswith(("http://", "https://")):
        raise reader.error(f"invalid location '{value}': URI schemes are not supported")
    return trimmed


def _parse_search(entries: list[str] | None, reader: _FileReader) -> list[str] | None:
    """``unqualified-search-registries``: each must be a ``host[:port]``."""
    if entries is None:
        return None
    result = [_parse_location(entry, reader) for entry in entries]
    for entry in result:
        if not _ANCHORED_DOMAIN.fullmatch(entry):
            raise reader.error(f"Invalid unqualified-search-registries entry {entry!r}")
    return result


def _parse_proxy(value: str, reader: _FileReader) -> str | None:
    if not value:
        return None
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in _PROXY_SCHEMES:
        raise reader.error(f'proxy URL scheme "{scheme}" is not supported. Supported are http, https, socks5, socks5h')
    return value


def _parse_registry(table: Mapping[str, Any], reader: _FileReader) -> Registry:
    where = "registry."
    location = _parse_location(reader.string(table, "location", where), reader)
    prefix = reader.string(table, "prefix", where)
    if not prefix:
        if not location:
            raise reader.error("invalid condition: both location and prefix are unset")
        prefix = location
    else:
        prefix = _parse_location(prefix, reader)
        if not prefix.startswith("*.") and not location:
            raise reader.error("invalid condition: location is unset and prefix is not in the format: *.example.com")
    if prefix.startswith("*.") and any(c in prefix for c in "/@:"):
        raise reader.error(
            f"Wildcarded prefix should be in the format: *.example.com. Current prefix {prefix!r} is incorrectly"
            " formatted"
        )
    if reader.string(table, "pull-from-mirror", where):
        raise reader.error(f"pull-from-mirror must not be set for a non-mirror registry {prefix!r}")
    by_digest_only = reader.boolean(table, "mirror-by-digest-only", where)
    mirrors = tuple(_parse_mirror(m, prefix, by_digest_only, reader) for m in reader.tables(table, "mirror", where))
    return Registry(
        prefix=prefix,
        location=location,
        insecure=reader.boolean(table, "insecure", where),
        blocked=reader.boolean(table, "blocked", where),
        mirror_by_digest_only=by_digest_only,
        mirrors=mirrors,
        proxy=_parse_proxy(reader.string(table, "proxy", where), reader),
    )


def _parse_mirror(table: Mapping[str, Any], prefix: str, by_digest_only: bool, reader: _FileReader) -> Mirror:
    where = "registry.mirror."
    location = _parse_location(reader.string(table, "location", where), reader)
    if not location:
        raise reader.error("invalid condition: mirror location is unset")
    pull_from = reader.string(table, "pull-from-mirror", where)
    if by_digest_only and pull_from:
        raise reader.error(
            f"cannot set mirror usage mirror-by-digest-only for the registry ({prefix!r}) and pull-from-mirror for"
            f" per-mirror ({location!r}) at the same time"
        )
    if pull_from not in ("", MIRROR_ALL, MIRROR_DIGEST_ONLY, MIRROR_TAG_ONLY):
        raise reader.error(f"unsupported pull-from-mirror value {pull_from!r} for mirror {location!r}")
    return Mirror(
        location=location,
        insecure=reader.boolean(table, "insecure", where),
        proxy=_parse_proxy(reader.string(table, "proxy", where), reader),
        pull_from_mirror=cast(PullFromMirror, pull_from or MIRROR_ALL),
    )


def _check_conflicts(registries: list[Registry], reader: _FileReader) -> None:
    """Tables for the same location (or the same wildcard prefix) must agree on insecure, proxy and blocked."""
    seen: dict[str, Registry] = {}
    for registry in registries:
        key = registry.location or registry.prefix
        other = seen.setdefault(key, registry)
        for name in ("insecure", "proxy", "blocked"):
            if getattr(other, name) != getattr(registry, name):
                raise reader.error(
                    f"registry '{registry.location}' is defined multiple times with conflicting '{name}' setting"
                )


def _v1_lists(document: Mapping[str, Any], reader: _FileReader) -> dict[str, list[str]] | None:
    """The ``[registries.search|insecure|block]`` lists when any is present (``V1RegistriesConf.hasSetField``)."""
    section = document.get("registries")
    if not isinstance(section, dict):
        return None
    lists: dict[str, list[str]] = {}
    for name in ("search", "insecure", "block"):
        sub = section.get(name)
        if isinstance(sub, dict):
            values = reader.strings(sub, "registries", f"registries.{name}.")
            if values is not None:
                lists[name] = values
    return lists or None


def _convert_v1(lists: dict[str, list[str]], reader: _FileReader) -> _ParsedFile:
    """``V1RegistriesConf.ConvertToV2``: block, then insecure, each a registry whose prefix is its location."""
    flags: dict[str, dict[str, bool]] = {}
    for kind, attribute in (("block", "blocked"), ("insecure", "insecure")):
        for entry in lists.get(kind, []):
            location = _parse_location(entry, reader)
            flags.setdefault(location, {})[attribute] = True
    registries = [Registry(prefix=loc, location=loc, **values) for loc, values in flags.items()]
    return _ParsedFile(
        registries=registries,
        unqualified_search_registries=_parse_search(lists.get("search"), reader),
        credential_helpers=None,
        short_name_mode=None,
        additional_layer_store_auth_helper="",
    )
