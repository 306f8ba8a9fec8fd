"""registries.d (containers-registries.d(5)): where docker:// images keep their signatures.

Every ``*.yaml`` file of the directory (``--registries.d DIR``, else ``$HOME/.config/containers/registries.d``
if it exists, else ``/etc/containers/registries.d``) may hold ``default-docker`` and ``docker: {NAMESPACE:
...}`` sections with ``lookaside`` (``sigstore`` is its old name), ``lookaside-staging`` (for writers: not
read here) and ``use-sigstore-attachments``. The most specific namespace that sets a value wins, as in
containers/image; without any ``lookaside``, the built-in default directory is read
(``/var/lib/containers/sigstore`` for root, ``~/.local/share/containers/sigstore`` otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from proxy.common import jsonlimits
from proxy.image.reference import DockerReference
from proxy.policy.errors import PolicyFileError
from proxy.policy.scopes import docker_namespaces

SYSTEM_REGISTRIES_D = "/etc/containers/registries.d"
USER_REGISTRIES_D = ".config/containers/registries.d"
MAX_FILE_SIZE = 1 << 20


@attrs.frozen
class Namespace:
    lookaside: str | None = None
    lookaside_staging: str | None = None
    use_sigstore_attachments: bool | None = None


@attrs.frozen
class RegistriesD:
    default: Namespace | None = None
    docker: Mapping[str, Namespace] = attrs.field(factory=dict)
    #: where the files were read (for error texts)
    directory: str = ""

    def _chain(self, ref: DockerReference) -> list[Namespace]:
        identity = ref.name + (f":{ref.tag}" if ref.tag else f"@{ref.digest}" if ref.digest else "")
        found = [self.docker[name] for name in (identity, *docker_namespaces(ref)) if name in self.docker]
        if self.default is not None:
            found.append(self.default)
        return found

    def lookaside_base(self, ref: DockerReference, environ: Mapping[str, str] | None = None) -> str:
        """The lookaside URL of ``ref``'s repository (``BASE/<path>``, without ``@digest/signature-N``)."""
        base = next((ns.lookaside for ns in self._chain(ref) if ns.lookaside), None)
        if base is None:
            base = builtin_lookaside(environ)
        parts = urlsplit(base)
        return urlunsplit(parts._replace(path=parts.path + "/" + ref.path))

    def use_sigstore_attachments(self, ref: DockerReference) -> bool:
        return next(
            (ns.use_sigstore_attachments for ns in self._chain(ref) if ns.use_sigstore_attachments is not None),
            False,
        )


def builtin_lookaside(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return "file:///var/lib/containers/sigstore"
    home = environ.get("HOME") or os.path.expanduser("~")
    return "file://" + os.path.join(home, ".local/share/containers/sigstore")


def registries_d_dir(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    if explicit:
        return explicit
    environ = os.environ if environ is None else environ
    home = environ.get("HOME") or os.path.expanduser("~")
    user = os.path.join(home, USER_REGISTRIES_D)
    return user if os.path.isdir(user) else SYSTEM_REGISTRIES_D


def _namespace(doc: Any, path: str, where: str) -> Namespace:
    def fail(why: str):
        raise PolicyFileError(f"{path}: {where}: {why}", path)

    if doc is None:
        return Namespace()
    if not isinstance(doc, dict):
        fail("must be a mapping")
    values: dict[str, Any] = {}
    for key in ("lookaside", "sigstore", "lookaside-staging", "sigstore-staging"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            fail(f"{key} must be a URL")
        values[key] = value
    use = doc.get("use-sigstore-attachments")
    if use is not None and not isinstance(use, bool):
        fail("use-sigstore-attachments must be true or false")
    return Namespace(
        lookaside=values["lookaside"] or values["sigstore"],
        lookaside_staging=values["lookaside-staging"] or values["sigstore-staging"],
        use_sigstore_attachments=use,
    )


def load_registries_d(directory: str) -> RegistriesD:
    """Read every ``*.yaml`` of ``directory`` (a missing directory is an empty configuration)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return RegistriesD(directory=directory)
    except OSError as e:
        raise PolicyFileError(f"reading {directory}: {(e.strerror or str(e)).lower()}", directory) from None
    default: Namespace | None = None
    default_from = ""
    docker: dict[str, Namespace] = {}
    docker_from: dict[str, str] = {}
    for name in names:
        path = os.path.join(directory, name)
        if not name.endswith(".yaml") or not os.path.isfile(path):
            continue
        import yaml  # about 8 ms: only where a registries.d file exists

        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
            if len(data) > MAX_FILE_SIZE:
                raise PolicyFileError(f"{path}: larger than {MAX_FILE_SIZE} bytes", path)
            jsonlimits.check_yaml_depth(data)  # safe_load recurses once per level
            doc = yaml.safe_load(data)
        except OSError as e:
            raise PolicyFileError(f"reading {path}: {(e.strerror or str(e)).lower()}", path) from None
        except (yaml.YAMLError, jsonlimits.NestingError) as e:
            raise PolicyFileError(f"parsing {path}: {e}", path) from None
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise PolicyFileError(f"{path}: the top level must be a mapping", path)
        if "default-docker" in doc:
            if default is not None:
                raise PolicyFileError(f"default-docker is defined both in {default_from} and {path}", path)
            default, default_from = _namespace(doc["default-docker"], path, "default-docker"), path
        sections = doc.get("docker") or {}
        if not isinstance(sections, dict):
            raise PolicyFileError(f"{path}: docker must be a mapping of namespaces", path)
        for key, value in sections.items():
            key = str(key)
            if key in docker:
                raise PolicyFileError(f"docker namespace {key} is defined both in {docker_from[key]} and {path}", path)
            docker[key] = _namespace(value, path, f"docker[{key!r}]")
            docker_from[key] = path
    return RegistriesD(default, docker, directory)
