"""The daemon's settings, as parsed from the command line (later also from config files)."""

from __future__ import annotations

import attrs

from proxy.config import CredentialSource
from proxy.image import manifest as mf
from proxy.policy import ImagePolicy
from proxy.registry.settings import RegistrySettings
from proxy.server.limits import SessionLimits
from proxy.sources.base import SourceOptions


@attrs.frozen
class ProxyOptions:
    """Everything a session needs to know about how it was started."""

    source_options: SourceOptions = attrs.field(factory=SourceOptions)
    registry: RegistrySettings = attrs.field(factory=RegistrySettings)
    #: registry credentials (flags, auth files, helpers); None: anonymous everywhere
    credentials: CredentialSource | None = None
    #: ``--blob-cache DIR`` (None: no cache) and ``--blob-cache-max`` bytes (None: no limit)
    blob_cache: str | None = None
    blob_cache_max: int | None = None
    #: what one connection may hold and do
    limits: SessionLimits = attrs.field(factory=SessionLimits)
    #: the signature policy OpenImage enforces (default: the system's policy.json, as skopeo reads it)
    policy: ImagePolicy = attrs.field(factory=ImagePolicy.system_default)
    override_os: str | None = None
    override_arch: str | None = None
    override_variant: str | None = None
    debug: bool = False

    @property
    def platforms(self) -> list[mf.Platform]:
        """Platforms wanted when choosing from a manifest list, most preferred first."""
        return mf.wanted_platforms(self.override_os, self.override_arch, self.override_variant)
