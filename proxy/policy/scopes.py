"""Which policy scope an image falls under: its transport, its identity and the namespaces around it.

As containers/image looks a policy up: the transport's section, first the image's own identity, then its
namespaces from the most specific to the least, then the transport's ``""`` entry, then the global default.

- ``docker``: ``host/ns/repo:tag`` (or ``@digest``), then ``host/ns/repo``, ``host/ns``, ``host``, then
  ``*.sub.example.com``, ``*.example.com``, ``*.com`` (the host without its port).
- ``dir``: the absolute path with symlinks resolved, then each parent directory (not ``/``).
- ``oci`` / ``oci-archive``: ``PATH:NAME`` (or ``PATH``), then ``PATH``, then PATH's parents.
- ``docker-archive``: only the transport's ``""`` entry.
"""

from __future__ import annotations

import os
import posixpath

import attrs

from proxy.image.reference import DockerReference, parse_docker_reference


@attrs.frozen
class ImageScope:
    """What the policy needs to know about an image reference."""

    transport: str
    #: the most specific scope name (may be "": no scope but the transport's default)
    identity: str
    #: the enclosing scopes, most specific first
    namespaces: tuple[str, ...] = ()
    #: the image's Docker reference, used by identity rules (None: the transport has none)
    docker_reference: DockerReference | None = None


def docker_namespaces(ref: DockerReference) -> tuple[str, ...]:
    found = []
    name = ref.name
    while True:
        found.append(name)
        slash = name.rfind("/")
        if slash == -1:
            break
        name = name[:slash]
    host = name.split(":", 1)[0]
    while "." in host:
        host = host[host.index(".") + 1 :]
        found.append("*." + host)
    return tuple(found)


def _path_parents(path: str) -> tuple[str, ...]:
    found = []
    while True:
        slash = path.rfind("/")
        if slash <= 0:
            break
        path = path[:slash]
        found.append(path)
    return tuple(found)


def _resolve(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def image_scope(reference: str, opened_path: str | None = None) -> ImageScope:
    """The scope of ``TRANSPORT:REF``; the reference was already accepted by its transport.

    ``opened_path``: for a local transport, the path the kernel opened (``ImageSource.local_path``); the scope is
    matched on it rather than on the reference's text, so a symlink and ``..`` cannot make the policy judge one
    path while another is read. Without it, the text is resolved here (as containers/image does)."""
    transport, _, within = reference.partition(":")
    if transport == "docker":
        ref = parse_docker_reference(within[2:] if within.startswith("//") else within).with_default_tag()
        identity = ref.name + (f":{ref.tag}" if ref.tag else f"@{ref.digest}")
        return ImageScope(transport, identity, docker_namespaces(ref), ref)
    if transport == "dir":
        path = opened_path or _resolve(within)
        return ImageScope(transport, path, _path_parents(path))
    if transport in ("oci", "oci-archive"):
        path, _, name = within.partition(":")
        path = opened_path or _resolve(path)
        if name:
            return ImageScope(transport, f"{path}:{name}", (path, *_path_parents(path)))
        return ImageScope(transport, path, _path_parents(path))
    if transport == "docker-archive":
        _, _, rest = within.partition(":")
        docker_ref = None
        if rest and not rest.startswith("@"):
            try:
                docker_ref = parse_docker_reference(rest)
            except ValueError:
                docker_ref = None
        return ImageScope(transport, "", (), docker_ref)
    return ImageScope(transport, "")


def scope_problem(transport: str, scope: str) -> str | None:
    """Why ``scope`` cannot be a key under ``transports.<transport>``, or None."""
    if scope == "":
        return None
    if transport in ("dir", "oci", "oci-archive"):
        path = scope.partition(":")[0] if transport != "dir" else scope
        if not path.startswith("/"):
            return "must be an absolute path"
        if path == "/":
            return 'use the default policy ("") instead of /'
        if posixpath.normpath(path) != path:
            return f"uses non-canonical format, perhaps try {posixpath.normpath(path)}"
    if transport == "docker-archive":
        return 'docker-archive: does not support any scopes except the default "" one'
    return None
