"""A synchronous wrapper of the client bindings, for scripts.

::

    with SyncImageProxy() as proxy:
        img = proxy.open_image("oci:examples/hello:latest")
        digest, manifest = proxy.get_manifest(img)

        image = proxy.pull("oci:examples/hello:latest", sinks)  # protocol.client.pull: all layers, verified

The trio client runs in a private thread; each method call hops into it and waits (callbacks such as a pull's
sinks and ``on_event`` run in that thread). ``SyncImageProxy(socket_path=...)`` talks to a running daemon
instead of spawning a server.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import trio

from protocol.client import ImageProxy
from protocol.client.pull import PulledImage, pull

_METHODS = (
    "get_capabilities",
    "open_image",
    "open_image_optional",
    "close_image",
    "get_manifest",
    "get_config",
    "get_full_config",
    "get_layer_info",
    "get_blob",
    "get_raw_blob",
    "copy_blob",
    "copy_raw_blob",
)


class SyncImageProxy:
    def __init__(
        self,
        argv: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        *,
        socket_path: str | os.PathLike[str] | None = None,
        request_ids: bool = True,
    ) -> None:
        self._argv, self._extra = argv, tuple(extra_args)
        self._socket_path, self._request_ids = socket_path, request_ids
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._proxy: ImageProxy | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="image-proxy-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # reported to the constructor or to close()
            self._startup_error = e
        finally:
            self._ready.set()

    async def _main(self) -> None:
        if self._socket_path is not None:
            opened = ImageProxy.connect(self._socket_path, request_ids=self._request_ids)
        else:
            opened = ImageProxy.spawn(self._argv, self._extra, request_ids=self._request_ids)
        async with opened as proxy:
            self._proxy = proxy
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def _run(self, name: str, *args: Any) -> Any:
        if self._proxy is None or self._token is None:
            raise RuntimeError("the proxy is closed")
        return trio.from_thread.run(getattr(self._proxy, name), *args, trio_token=self._token)

    def __getattr__(self, name: str) -> Any:
        if name in _METHODS:
            return lambda *args: self._run(name, *args)
        raise AttributeError(name)

    def pull(self, reference: str, sinks: Any, **options: Any) -> PulledImage:
        """``protocol.client.pull.pull`` on this connection (same options); the sinks run in the client's thread."""
        if self._proxy is None or self._token is None:
            raise RuntimeError("the proxy is closed")
        proxy = self._proxy
        return trio.from_thread.run(lambda: pull(proxy, reference, sinks, **options), trio_token=self._token)

    @property
    def version(self) -> str:
        assert self._proxy is not None
        return self._proxy.version_text

    @property
    def uses_request_ids(self) -> bool:
        assert self._proxy is not None
        return self._proxy.uses_request_ids

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._token = None
        self._thread.join()
        self._proxy = None

    def __enter__(self) -> SyncImageProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
