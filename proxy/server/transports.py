"""``TRANSPORT:REFERENCE`` -> an opened ImageSource (c/image ``alltransports.ParseImageName``)."""

from __future__ import annotations

from proxy.image.gojson import go_quote
from proxy.registry.client import RegistryClient
from proxy.registry.source import open_registry
from proxy.sources.archive import open_docker_archive, open_oci_archive
from proxy.sources.base import ImageSource, SourceError, SourceOptions
from proxy.sources.dir import open_dir
from proxy.sources.oci_layout import open_oci_layout

_OPENERS = {
    "oci": open_oci_layout,
    "oci-archive": open_oci_archive,
    "docker-archive": open_docker_archive,
    "dir": open_dir,
}

#: transports skopeo knows that need a local engine, which image-proxy does not use
_NO_ENGINE = {
    "containers-storage": "it needs local container engine storage (podman/buildah), which image-proxy does not access",
    "docker-daemon": "it needs access to a Docker daemon, which image-proxy does not have",
    "ostree": "it needs an ostree repository, which image-proxy does not read",
    "sif": "Singularity images are not supported by image-proxy",
    "tarball": "the tarball transport is not supported by image-proxy",
}


async def open_source(ref: str, options: SourceOptions, registry: RegistryClient | None = None) -> ImageSource:
    """Open the image ``ref`` names; SourceError (or ImageNotFound) naming ``ref`` on failure.

    ``registry`` is the session's registry client, for ``docker://`` references.
    """
    transport, sep, within = ref.partition(":")
    if not sep:
        raise SourceError(f"Invalid image name {go_quote(ref)}, expected colon-separated transport:reference")
    opener = _OPENERS.get(transport)
    if opener is not None:
        return await opener(ref, within, options)
    if transport in _NO_ENGINE:
        raise SourceError(f"{ref}: the {transport}: transport cannot work in image-proxy: {_NO_ENGINE[transport]}")
    if transport == "docker":
        return await open_registry(ref, within, registry)
    raise SourceError(f"Invalid image name {go_quote(ref)}, unknown transport {go_quote(transport)}")


__all__ = ["open_source"]
