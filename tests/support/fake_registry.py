"""A fake registry built on the scripted server of ``tests/http/server.py``, for hostile-registry tests.

``serve_registry()`` answers ``GET /v2/`` with 200 and whatever the test routes for manifests and blobs
(:meth:`FakeRegistry.manifest`, :meth:`FakeRegistry.blob`, or a whole image with :meth:`FakeRegistry.add_image`).
Besides the scripted :class:`~tests.http.server.Reply`, it can send a :class:`RawReply`: bytes written to the
socket verbatim, for answers h11 refuses to produce (a body longer than its ``Content-Length``).
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import h11
import trio

from proxy.image import manifest as mf
from tests.http.server import Recorded, Reply, TestServer, serve_on_loopback


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.define
class RawReply(Reply):
    """Write ``raw`` as it is (status line, headers and body), then close, or stay open and silent."""

    raw: bytes = b""
    #: after writing, keep the connection open and never answer again (else: close it)
    keep_open: bool = False


@attrs.frozen
class Blob:
    data: bytes
    media_type: str = mf.OCI_LAYER

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@attrs.frozen
class Image:
    """An OCI image: its manifest bytes, config and layers."""

    manifest: bytes
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def compact(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def make_image(seed: str, layer_count: int = 1) -> Image:
    """A small deterministic OCI image (the layers are opaque bytes: nothing here unpacks them)."""
    layers = tuple(Blob(f"layer {i} of {seed}\n".encode() * 64) for i in range(layer_count))
    config = Blob(
        compact(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            }
        ),
        mf.OCI_CONFIG,
    )
    manifest = compact(
        {
            "schemaVersion": 2,
            "mediaType": mf.OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    return Image(manifest, config, layers)


def manifest_reply(
    body: bytes, content_type: str | None = mf.OCI_MANIFEST, *, content_length: bool = True, lf_only: bool = False
) -> Reply:
    """A 200 with ``body`` and, unless None, that Content-Type."""
    headers = [("Content-Type", content_type)] if content_type else []
    return Reply(headers=headers, body=body, content_length=content_length, lf_only=lf_only)


def raw_response(status_line: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    head = status_line + b"\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    return head + body


class FakeRegistryServer(TestServer):
    """The scripted server, plus :class:`RawReply`."""

    __test__ = False

    async def _respond(self, stream: trio.abc.Stream, conn: h11.Connection, reply: Reply, head_only: bool) -> bool:
        if isinstance(reply, RawReply):
            await stream.send_all(reply.raw)
            if reply.keep_open:
                await trio.sleep_forever()  # parked until the test's nursery is cancelled
            return False
        return await super()._respond(stream, conn, reply, head_only)


class FakeRegistry:
    """Routes of a fake distribution-API registry on a :class:`FakeRegistryServer`."""

    def __init__(self, server: FakeRegistryServer) -> None:
        self.server = server
        server.route("/v2/", Reply(headers=[("Content-Type", "application/json")], body=b"{}"))

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"docker://{self.authority}/{repository}:{tag}"

    def ref_by_digest(self, repository: str, digest: str) -> str:
        return f"docker://{self.authority}/{repository}@{digest}"

    def url(self, path: str) -> str:
        return self.server.url(path)

    @staticmethod
    def manifest_path(repository: str, reference: str) -> str:
        return f"/v2/{repository}/manifests/{reference}"

    @staticmethod
    def blob_path(repository: str, digest: str) -> str:
        return f"/v2/{repository}/blobs/{digest}"

    def manifest(self, repository: str, reference: str, *replies: Reply) -> None:
        self.server.route(self.manifest_path(repository, reference), *replies)

    def blob(self, repository: str, digest: str, *replies: Reply) -> None:
        self.server.route(self.blob_path(repository, digest), *replies)

    def add_blob(self, repository: str, blob: Blob) -> None:
        self.blob(
            repository, blob.digest, Reply(headers=[("Content-Type", "application/octet-stream")], body=blob.data)
        )

    def add_image(self, repository: str, tag: str, image: Image) -> None:
        """The image under ``tag`` and its digest, with its config and layers."""
        reply = manifest_reply(image.manifest)
        reply.headers.append(("Docker-Content-Digest", image.digest))
        self.manifest(repository, tag, reply)
        self.manifest(repository, image.digest, reply)
        for blob in (image.config, *image.layers):
            self.add_blob(repository, blob)

    def requests_for(self, path: str) -> list[Recorded]:
        return [r for r in self.server.requests if r.target.split("?")[0] == path]


@asynccontextmanager
async def serve_registry(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[FakeRegistry]:
    """Run a :class:`FakeRegistry` on 127.0.0.1 (an ephemeral port) for the duration of the block."""
    server = FakeRegistryServer(ssl_context)
    async with serve_on_loopback(server._handle, ssl_context) as port:
        server.port = port
        yield FakeRegistry(server)
