"""The ``docker://`` transport: an image in a registry, reached through its pull sources.

A pull source is a mirror or the primary location (registries.conf); the manifest comes from the first
source that has it, and **each blob chooses its source anew**: a mirror that answers 404, 5xx, 429 or
fails for a blob is passed over for the next one. A 404 is final only from the primary registry, with
a distribution "unknown" code, and for a blob the manifest names only after a second try later than a
pull-through proxy's negative cache (Kraken answers 404 for "backend unavailable"). A blob whose body
breaks off (a stall, a reset) resumes from the other sources first, the one that failed last. Nothing negative
is remembered across requests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from protocol.errors import ErrorCode
from proxy.common import jsonlimits
from proxy.config import ConfigError, PullSource
from proxy.http.connection import Response
from proxy.http.errors import HTTPError
from proxy.http.ranges import parse_content_range, range_between, range_from
from proxy.http.retry import ONE_TRY
from proxy.image import manifest as mf
from proxy.image.reference import DockerReference, parse_docker_reference
from proxy.registry.client import RegistryClient, RegistryError
from proxy.registry.resume import ResumingBlob
from proxy.server.metrics import STATS
from proxy.sources.base import Blob, BlobNotFound, ImageNotFound, ImageSource, SourceError

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 << 20
MANIFEST_TYPES = (
    mf.OCI_MANIFEST,
    mf.OCI_INDEX,
    mf.DOCKER_V2S2,
    mf.DOCKER_V2_LIST,
    mf.DOCKER_V2S1_SIGNED,
    mf.DOCKER_V2S1,
)
MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES)
#: a 404 for a blob the manifest names is asked again after this long (longer than a proxy's 1 s cache)
NEGATIVE_CACHE_DELAY = 1.5
#: how many times such a 404 is asked again before it is believed
BLOB_404_RETRIES = 1
# A failing mirror gets ONE_TRY and is passed over for the next source; the primary gets the full policy.


class RangesIgnored(SourceError):
    """The server answered a single-range request with the whole blob (200): partial reads are impossible
    there. The body was abandoned (its connection closed), not read."""


class _BodyFailed(Exception):
    """A manifest body failed in a way that may pass on another try."""

    def __init__(self, error: RegistryError) -> None:
        self.error = error


def _referenced_digests(raw: bytes) -> set[str]:
    try:
        doc = jsonlimits.loads(raw)
    except ValueError:
        return set()
    found = set()
    if isinstance(doc, dict):
        for key in ("config",):
            if isinstance(doc.get(key), dict) and isinstance(doc[key].get("digest"), str):
                found.add(doc[key]["digest"])
        for key in ("layers", "manifests"):
            for entry in doc.get(key) or []:
                if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
                    found.add(entry["digest"])
    return found


def _content_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


class RegistrySource(ImageSource):
    stores_signatures = True

    def __init__(self, reference: str, image: DockerReference, sources: list[PullSource], client: RegistryClient):
        self.reference = reference
        self._image = image
        self._sources = sources
        self._client = client
        #: blobs named by manifests fetched here: a 404 for one of them is not believed at once
        self._named: set[str] = set()
        #: the pull source (primary or mirror) that served the image's manifest
        self._manifest_from: PullSource | None = None

    @property
    def client(self) -> RegistryClient:
        return self._client

    @property
    def domain(self) -> str:
        """The registry the reference names (before mirrors and rewrites)."""
        return self._image.domain

    # ------------------------------------------------------------------ manifests

    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        wanted = instance_digest or self._image.digest or self._image.tag or "latest"
        failures: list[RegistryError] = []
        for source in self._sources:
            try:
                raw, mime = await self._fetch_manifest(source, wanted)
            except RegistryError as e:
                if source.is_mirror:
                    self._fell_back(source, f"manifest {wanted}", e)
                    failures.append(e)
                    continue
                if e.not_found and instance_digest is None:
                    raise ImageNotFound(f"{self.reference}: {e}") from None
                failures.append(e)
                break
            self._named |= _referenced_digests(raw)
            if instance_digest is None and self._manifest_from is None:
                self._manifest_from = source
            return raw, mime
        retryable = bool(failures) and all(f.code is ErrorCode.RETRYABLE for f in failures)
        text = "; ".join(str(f) for f in failures) or f"reading manifest {wanted}: no pull source"
        raise SourceError(f"{self.reference}: {text}", ErrorCode.RETRYABLE if retryable else ErrorCode.OTHER)

    async def get_tagged_manifest(self, tag: str) -> tuple[bytes, str] | None:
        """The manifest tagged ``tag`` in this image's repository (e.g. a sigstore attachment,
        ``sha256-<hex>.sig``), or None when the primary registry says it does not exist."""
        for source in self._sources:
            try:
                return await self._fetch_manifest(source, tag)
            except RegistryError as e:
                if source.is_mirror:
                    continue
                if e.not_found:
                    return None
                raise SourceError(f"{self.reference}: {e}", e.code) from None
        return None

    async def _fetch_manifest(self, source: PullSource, wanted: str) -> tuple[bytes, str]:
        """One source's manifest; a body cut short or stalled is fetched again (a manifest is small and
        is never resumed) as often as the source's retry policy allows."""
        policy = ONE_TRY if source.is_mirror else self._client.settings.retry
        for attempt in range(1, policy.attempts + 1):
            try:
                return await self._fetch_manifest_once(source, wanted)
            except _BodyFailed as e:
                if attempt == policy.attempts:
                    raise e.error from None
                log.info("%s; fetching it again (attempt %d of %d)", e.error, attempt + 1, policy.attempts)
                await trio.sleep(policy.delay(attempt - 1))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch_manifest_once(self, source: PullSource, wanted: str) -> tuple[bytes, str]:
        response = await self._client.get(
            source.reference.domain,
            source.reference.path,
            f"manifests/{wanted}",
            [("Accept", MANIFEST_ACCEPT)],
            logical_host=self._image.domain,
            retry=ONE_TRY if source.is_mirror else None,
        )
        what = f"reading manifest {wanted} in {source.reference.name}"
        if response.status != 200:
            raise await self._client.failure(response, what, source.reference.domain)
        async with response:
            try:
                raw = await response.read_all(MAX_MANIFEST_SIZE)
            except HTTPError as e:
                error = RegistryError(f"{what}: {e}", retryable=e.retryable)
                if e.retryable:
                    raise _BodyFailed(error) from None
                raise error from None
        if ":" in wanted:  # by digest: the bytes must be what was asked for
            algo = wanted.split(":", 1)[0]
            if mf.digest_of(raw, algo) != wanted:
                raise RegistryError(f"{what}: the registry sent a manifest whose digest is {mf.digest_of(raw, algo)}")
        mime = self._manifest_type(raw, _content_type(response.headers.get("content-type")), what)
        return raw, mime

    @staticmethod
    def _manifest_type(raw: bytes, content_type: str, what: str) -> str:
        guessed = mf.guess_mime_type(raw)
        try:
            declared = jsonlimits.loads(raw).get("mediaType")
        except (ValueError, AttributeError):
            raise RegistryError(f"{what}: the registry sent a manifest that is not a JSON object") from None
        if isinstance(declared, str) and declared and content_type in MANIFEST_TYPES and declared != content_type:
            raise RegistryError(f"{what}: Content-Type {content_type} contradicts the manifest's mediaType {declared}")
        if content_type in MANIFEST_TYPES and not declared:
            return content_type
        return guessed

    def _fell_back(self, source: PullSource, what: str, error: RegistryError) -> None:
        """A mirror failed: a warning line and a count (image_proxy_mirror_fallbacks_total); the next source is
        asked (the primary is always last)."""
        STATS.mirror_fallback(source.reference.domain)
        log.warning(
            "%s: %s: mirror %s failed (%s); trying the next pull source",
            self.reference,
            what,
            source.reference.domain,
            error,
        )

    # ------------------------------------------------------------------ blobs

    @property
    def cache_key(self) -> str:  # type: ignore[override]
        """The repository that served the image's manifest (``registry.example/team/app``, or the mirror's
        repository that answered for it): downloads are shared, partials resumed and cached blobs served only
        between pulls from it. Opening the image fetched a manifest there with this client's credentials, so that
        registry let this client read that repository; a repository's blobs are not another's (a registry serves a
        blob only from a repository it was pushed or mounted into). The physical one, not the name the client
        wrote: a mirror that serves anyone a manifest for a name (``pull-from-mirror = "digest-only"`` sends a
        digest there) proves nothing about the primary repository of that name."""
        served = self._manifest_from
        return served.reference.name if served is not None else self._image.name

    def ranged_source(self) -> RegistrySource:
        return self

    async def open_blob(self, digest: str, expected_size: int | None = None) -> Blob:
        return await self.open_blob_from(digest, 0)

    async def open_blob_from(self, digest: str, offset: int, end: int | None = None) -> ResumingBlob:
        """The blob from byte ``offset`` on (a Range request), from the first source that has it; with
        ``end``, only bytes ``[offset, end)`` (a 206 for exactly those is required, resumes ask for the rest of
        them; a 200 raises RangesIgnored).

        Not found only when the primary registry says so (twice, for a blob a manifest names);
        retryable when every source failed in a way that may pass.
        """
        failures: list[tuple[PullSource, RegistryError]] = []
        for source in self._sources:
            try:
                return await self._open_blob_at(source, digest, offset, end)
            except RegistryError as e:
                failures.append((source, e))
                if source.is_mirror:
                    self._fell_back(source, f"blob {digest}", e)
        text = "; ".join(f"{source.reference.domain}: {error}" for source, error in failures)
        if any(error.status == 404 and not source.is_mirror for source, error in failures):
            raise BlobNotFound(f"{self.reference}: blob {digest} not found: {text}")
        retryable = all(error.code is ErrorCode.RETRYABLE for _, error in failures)
        code = ErrorCode.RETRYABLE if retryable else ErrorCode.OTHER
        raise SourceError(f"{self.reference}: fetching blob {digest}: {text}", code)

    async def _open_blob_at(
        self, source: PullSource, digest: str, offset: int = 0, end: int | None = None
    ) -> ResumingBlob:
        # A pull-through proxy in front of the primary may answer 404 while its backend is away: for a
        # blob a manifest names, ask once more after its negative cache expired. A mirror is passed over.
        retries = BLOB_404_RETRIES if (not source.is_mirror and digest in self._named) else 0
        for attempt in range(retries + 1):
            response = await self._request_blob(source, digest, offset, end)
            if 200 <= response.status < 300:
                if end is not None:
                    await self._check_range_answer(response, source, digest, offset, end)
                blob = ResumingBlob(
                    what=f"{self.reference}: blob {digest}",
                    response=response,
                    host=source.reference.domain,
                    reopen=self._reopener(digest, end, source.reference.domain),
                    policy=self._client.settings.resume,
                )
                await blob.start_at(offset)
                return blob
            error = await self._client.failure(response, f"fetching blob {digest}", source.reference.domain)
            if response.status != 404 or attempt == retries:
                raise error
            log.info("%s: %s; asking again in %.1f s", self.reference, error, NEGATIVE_CACHE_DELAY)
            await trio.sleep(NEGATIVE_CACHE_DELAY)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _check_range_answer(
        self, response: Response, source: PullSource, digest: str, offset: int, end: int
    ) -> None:
        """A bounded range must come back as a 206 for exactly those bytes; anything else is abandoned."""
        host = source.reference.domain
        got = parse_content_range(response.headers.get("content-range"))
        if response.status == 206 and got is not None and got.start == offset and got.end == end - 1:
            return
        await response.abandon()
        if response.status != 206:
            raise RangesIgnored(
                f"{self.reference}: blob {digest}: {host} answered a range request with {response.status} "
                f"{response.reason} (the whole blob): it cannot serve parts of blobs; use GetBlob"
            )
        raise SourceError(
            f"{self.reference}: blob {digest}: {host} answered bytes {offset}-{end - 1} with Content-Range "
            f"{response.headers.get('content-range')!r}",
            ErrorCode.RETRYABLE,
        )

    async def request_ranges(self, digest: str, range_value: str) -> tuple[Response, str]:
        """One GET of the blob with ``Range: range_value`` (a multi-range request), from the first source
        that answers 200, 206, 400 or 416; the caller owns the response, whatever its status."""
        failures: list[str] = []
        for source in self._sources:
            try:
                response = await self._request_blob(source, digest, range_header=range_value)
            except RegistryError as e:
                failures.append(f"{source.reference.domain}: {e}")
                continue
            if response.status in (200, 206, 400, 416):
                return response, source.reference.domain
            error = await self._client.failure(response, f"fetching ranges of blob {digest}", source.reference.domain)
            failures.append(f"{source.reference.domain}: {error}")
        raise SourceError(f"{self.reference}: fetching ranges of blob {digest}: {'; '.join(failures)}")

    async def _request_blob(
        self,
        source: PullSource,
        digest: str,
        offset: int = 0,
        end: int | None = None,
        range_header: str | None = None,
    ) -> Response:
        headers = [("Accept-Encoding", "identity")]
        if range_header is not None:
            headers.append(("Range", range_header))
        elif end is not None:
            headers.append(("Range", range_between(offset, end)))
        elif offset:
            headers.append(("Range", range_from(offset)))
        return await self._client.get(
            source.reference.domain,
            source.reference.path,
            f"blobs/{digest}",
            headers,
            logical_host=self._image.domain,
            retry=ONE_TRY if source.is_mirror else None,
        )

    def _reopener(self, digest: str, end: int | None, host: str) -> Callable[[int], Awaitable[tuple[Response, str]]]:
        """What a ResumingBlob calls to reopen the blob: each time, the source its body last came from (``host``
        at first) is asked last."""
        serving = host

        async def reopen(at: int) -> tuple[Response, str]:
            nonlocal serving
            response, serving = await self._reopen_blob(digest, at, end, failed=serving)
            return response, serving

        return reopen

    async def _reopen_blob(
        self, digest: str, offset: int, end: int | None = None, failed: str | None = None
    ) -> tuple[Response, str]:
        """The blob again from ``offset`` (to ``end``, if given; a fresh request: new redirect, new token),
        from any source; the host ``failed`` (whose body just broke off) is asked after the others, so that a
        mirror that stalls costs one stall deadline per blob, not one per resume until the blob fails."""
        failures: list[str] = []
        for source in sorted(self._sources, key=lambda s: s.reference.domain == failed):
            try:
                response = await self._request_blob(source, digest, offset, end)
            except RegistryError as e:
                failures.append(f"{source.reference.domain}: {e}")
                continue
            if response.status in (200, 206):
                return response, source.reference.domain
            error = await self._client.failure(response, f"resuming blob {digest}", source.reference.domain)
            failures.append(f"{source.reference.domain}: {error}")
        raise SourceError(
            f"{self.reference}: resuming blob {digest} at byte {offset}: {'; '.join(failures)}", ErrorCode.RETRYABLE
        )


async def open_registry(reference: str, within: str, client: RegistryClient | None) -> RegistrySource:
    """``docker://host/repo[:tag][@digest]``."""
    if client is None:
        raise SourceError(f"{reference}: the docker:// transport is not available in this context")
    if not within.startswith("//"):
        raise SourceError(f'Invalid image name "{reference}": docker: image reference {within} does not start with //')
    try:
        image = parse_docker_reference(within[2:])
    except ValueError as e:
        raise SourceError(f'Invalid image name "{reference}": {e}') from None
    if image.tag and image.digest:
        raise SourceError(
            f'Invalid image name "{reference}": '
            "Docker references with both a tag and digest are currently not supported"
        )
    image = image.with_default_tag()
    settings = client.settings
    if settings.registries_error is not None:
        raise SourceError(f"{reference}: {settings.registries_error}")
    try:
        sources = settings.registries.pull_sources(image)
    except ConfigError as e:
        raise SourceError(f"{reference}: {e}") from None
    return RegistrySource(reference, image, sources, client)
