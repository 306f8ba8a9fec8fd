"""``TRANSPORT:REFERENCE`` -> an opened ImageSource (c/image ``alltransports.ParseImageName``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.image.gojson import go_quote
from proxy.sources.base import ImageSource, SourceError, SourceOptions

if TYPE_CHECKING:
    from proxy.registry.client import RegistryClient

#: transport -> (module, opener): a module is imported when its transport is first used, so that a proxy serving
#: one oci: layout does not import the registry, HTTP and archive stacks (~30 ms of start-up, -X importtime)
_OPENERS = {
    "oci": ("proxy.sources.oci_layout", "open_oci_layout"),
    "oci-archive": ("proxy.sources.archive", "open_oci_archive"),
    "docker-archive": ("proxy.sources.archive", "open_docker_archive"),
    "dir": ("proxy.sources.dir", "open_dir"),
}

#: transports skopeo knows that need a local engine, which image-proxy does not use
_NO_ENGINE = {
    "containers-storage": "it needs local container engine storage (podman/buildah), which image-proxy does not access",
    "docker-daemon": "it needs access to a Docker daemon, which image-proxy does not have",
    "ostree": "it needs an ostree repository, which image-proxy does not read",
    "sif": "Singularity images are not supported by image-proxy",
    "tarball": "the tarball transport is not supported by image-proxy",
}


async def open_source(
    ref: str, options: SourceOptions, registry: Callable[[], RegistryClient | None] = lambda: None
) -> ImageSource:
    """Open the image ``ref`` names; SourceError (or ImageNotFound) naming ``ref`` on failure.

    ``registry()`` gives the session's registry client, for ``docker://`` references (asked only for those).
    """
    transport, sep, within = ref.partition(":")
    if not sep:
        raise SourceError(f"Invalid image name {go_quote(ref)}, expected colon-separated transport:reference")
    opener = _OPENERS.get(transport)
    if opener is not None:
        module, name = opener
        return await getattr(importlib.import_module(module), name)(ref, within, options)
    if transport in _NO_ENGINE:
        raise SourceError(f"{ref}: the {transport}: transport cannot work in image-proxy: {_NO_ENGINE[transport]}")
    if transport == "docker":
        from proxy.registry.source import open_registry

        return await open_registry(ref, within, registry())
    raise SourceError(f"Invalid image name {go_quote(ref)}, unknown transport {go_quote(transport)}")


__all__ = ["open_source"]
