"""A source whose blobs go through the blob cache: built once, at OpenImage, around a source that has a cache key
(a registry's), so that nothing else asks what type a source is.

Blobs come from the cache when it holds them verified, else from a download into it shared with every client
asking for that digest from the same source (``BlobStore.fetch``). The source is the repository that served the
client's manifest (``RegistrySource.cache_key``), which the client showed it may read by fetching that manifest with
its own credentials: the cache serves it only blobs downloaded from that repository (see ``proxy.cache.store``,
"Who is served what"). A download stops at the size the verified manifest gives (``trusted_sizes``), so an endless
body cannot fill the disk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proxy.cache.store import BlobStore
from proxy.server.metrics import STATS
from proxy.sources.base import Blob, ImageSource


class CachingSource(ImageSource):
    def __init__(
        self, inner: ImageSource, store: BlobStore, spawn: Callable[[Callable[[], Awaitable[None]]], None]
    ) -> None:
        """``spawn`` starts a download where it outlives the request that asked for it (the process's nursery)."""
        assert inner.cache_key is not None
        self.inner = inner
        self.reference = inner.reference
        self.local_path = inner.local_path
        self.stores_signatures = inner.stores_signatures
        self.cache_key = inner.cache_key
        self._store = store
        self._spawn = spawn
        #: blob sizes from the image's verified manifest
        self.trusted_sizes: dict[str, int] = {}

    async def get_manifest(self, instance_digest: str | None = None) -> tuple[bytes, str]:
        return await self.inner.get_manifest(instance_digest)

    async def open_blob(self, digest: str, expected_size: int | None = None) -> Blob:
        inner = self.inner
        if digest not in self.trusted_sizes:
            # not named by the verified manifest: no size bounds what a download of it would write, so it is
            # streamed uncached (a client's GetBlob of any digest, any size, cannot fill the cache's disk)
            return await inner.open_blob(digest, expected_size)
        blob = await self._store.fetch(
            digest,
            expected_size,
            lambda offset: inner.open_blob_from(digest, offset),
            self._spawn,
            source=self.cache_key,
            size_limit=self.trusted_sizes.get(digest),
        )
        STATS.cache_lookup(hit=blob.origin == "cache")  # a miss follows a download, or streams uncached
        return blob

    async def cached_blob(self, digest: str, size: int | None) -> Blob | None:
        return await self._store.open_cached(digest, size, self.cache_key)

    def ranged_source(self) -> ImageSource | None:
        return self.inner.ranged_source()

    async def aclose(self) -> None:
        await self.inner.aclose()


__all__ = ["CachingSource"]
