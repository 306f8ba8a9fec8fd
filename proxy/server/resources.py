"""What the sessions of one process share: the registry client (connection pool, token cache), the blob
store, and a nursery for the store's downloads.

A download runs in this nursery, not in the session that asked for it, so that a blob several clients of
a daemon are reading keeps coming when the first of them disconnects. It stops when its last reader goes
(see ``proxy.cache.store.FollowingBlob``) and, at the latest, when the process ends.

```
resources nursery
└── one task per cache download (shared by every reader of that digest)
```
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from proxy.cache.store import BlobStore
from proxy.common import threads
from proxy.server.options import ProxyOptions

if TYPE_CHECKING:
    from proxy.registry.client import RegistryClient


@attrs.define(eq=False)
class SharedResources:
    options: ProxyOptions
    store: BlobStore | None
    _nursery: trio.Nursery
    _registry: RegistryClient | None = None

    @classmethod
    def build(cls, options: ProxyOptions, nursery: trio.Nursery, store: BlobStore | None) -> SharedResources:
        """The one place shared resources are made: the given store, the nursery downloads run in, and (when
        first asked for) a registry client for ``options``."""
        return cls(options, store, nursery)

    @property
    def registry(self) -> RegistryClient:
        """The registry client, made on first use: a proxy that never opens a docker:// image never imports the
        registry and HTTP stack (~25 ms of start-up, -X importtime)."""
        if self._registry is None:
            from proxy.registry.client import RegistryClient

            self._registry = RegistryClient(self.options.registry, self.options.credentials)
        return self._registry

    async def aclose(self) -> None:
        """Close the registry client's connections, if one was made."""
        if self._registry is not None:
            await self._registry.aclose()

    def spawn(self, work: Callable[[], Awaitable[None]]) -> None:
        """Start background work that belongs to the process, not to one client (its worker threads are not
        counted in the share of the client that happened to start it)."""

        async def as_process() -> None:
            threads.no_client_threads()
            await work()

        self._nursery.start_soon(as_process)


def open_store(options: ProxyOptions) -> BlobStore | None:
    """The blob cache ``options`` ask for (None: no cache)."""
    return BlobStore(options.blob_cache, options.blob_cache_max) if options.blob_cache is not None else None


@contextlib.asynccontextmanager
async def open_resources(options: ProxyOptions) -> AsyncIterator[SharedResources]:
    """The shared resources for ``options``; on exit every background download is cancelled (partial files
    stay for the next pull) and every registry connection closed."""
    resources: SharedResources | None = None
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                resources = SharedResources.build(options, nursery, open_store(options))
                yield resources
            except BaseException as e:
                # re-raised outside the nursery, so callers see the error itself, not an ExceptionGroup
                failure = e
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if resources is not None:
            with trio.CancelScope(shield=True):
                await resources.aclose()
    if failure is not None:
        raise failure
