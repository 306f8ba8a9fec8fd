"""Docker references (``quay.io/fedora/fedora:42``, ``busybox``, ``x/y@sha256:…``) as
distribution/reference parses them: ``ParseNormalizedNamed`` with docker.io defaults."""

from __future__ import annotations

import re

import attrs

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE_RE = re.compile(
    rf"(?P<name>(?P<domain>{_DOMAIN})/(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*))"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?",
    re.ASCII,
)
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"


@attrs.frozen
class DockerReference:
    """A normalized reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/path``, the repository."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def with_default_tag(self) -> DockerReference:
        """``TagNameOnly``: ``latest`` when neither tag nor digest is given."""
        if self.tag is None and self.digest is None:
            return attrs.evolve(self, tag="latest")
        return self


def parse_docker_reference(text: str) -> DockerReference:
    """Parse like ``reference.ParseNormalizedNamed``; raises ValueError with a Go-like text."""
    if re.fullmatch(r"[a-f0-9]{64}", text):
        raise ValueError(f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings")
    first, slash, rest = text.partition("/")
    if not slash or (not any(c in first for c in ".:") and first != "localhost" and first.lower() == first):
        domain, remainder = DOCKER_HUB, text
    else:
        domain, remainder = first, rest
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in remainder.split(":")[0].split("@")[0]:
        remainder = "library/" + remainder
    repository = remainder.split("@")[0]
    name_part = repository.rsplit(":", 1)[0] if ":" in repository else repository
    if name_part.lower() != name_part:
        raise ValueError("repository name must be lowercase")
    m = _REFERENCE_RE.fullmatch(f"{domain}/{remainder}")
    if m is None or len(m.group("name")) > MAX_NAME_LENGTH:
        raise ValueError("invalid reference format")
    return DockerReference(m.group("domain"), m.group("path"), m.group("tag"), m.group("digest"))


def normalize_docker_reference(text: str, *, default_tag: bool = True) -> str:
    """``ParseNormalizedNamed`` (+ ``TagNameOnly``) rendered with ``String()``:
    "busybox" -> "docker.io/library/busybox:latest"."""
    ref = parse_docker_reference(text)
    return str(ref.with_default_tag() if default_tag else ref)
