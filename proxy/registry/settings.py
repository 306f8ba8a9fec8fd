"""How to reach registries, as the flags and files configured it: plain data, imported by the settings of every
proxy (the HTTP and registry stack it configures is imported only when a ``docker://`` image is opened)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import attrs

from proxy.config import RegistriesConf, cert_dirs_for
from proxy.http.retry import RetryPolicy
from proxy.http.timeouts import Timeouts


@attrs.frozen
class ResumePolicy:
    max_resumes: int = 10
    max_unproductive: int = 2
    progress_bytes: int = 1 << 20
    progress_seconds: float = 60.0


@attrs.frozen
class RegistrySettings:
    """How to reach registries: from the command line and registries.conf (later the daemon config)."""

    #: False: plain HTTP and unverified TLS allowed for every registry (``--tls-verify=false``)
    tls_verify: bool = True
    #: registries.conf; its ``insecure`` endpoints may use plain HTTP / unverified TLS
    registries: RegistriesConf = attrs.field(factory=RegistriesConf)
    #: why registries.conf could not be read: every docker:// open then fails with this text
    registries_error: str | None = None
    #: ``--cert-dir``: the one certs.d-style directory for every host
    cert_dir: str | None = None
    user_agent: str = "image-proxy/0.1"
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    resume: ResumePolicy = attrs.field(factory=ResumePolicy)
    environ: Mapping[str, str] = attrs.field(factory=lambda: dict(os.environ), repr=False)
    insecure_hosts: frozenset[str] = attrs.field(init=False)

    @insecure_hosts.default
    def _insecure_hosts(self) -> frozenset[str]:
        hosts = set()
        for registry in self.registries.registries:
            for endpoint in (registry.endpoint, *registry.mirrors):
                if endpoint.insecure and endpoint.location:
                    hosts.add(endpoint.location.split("/", 1)[0])
        return frozenset(hosts)

    def insecure(self, authority: str) -> bool:
        return not self.tls_verify or authority in self.insecure_hosts

    def cert_dirs(self, authority: str) -> list[Path]:
        return cert_dirs_for(authority, self.cert_dir, environ=self.environ)


__all__ = ["RegistrySettings", "ResumePolicy"]
