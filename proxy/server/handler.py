"""One method per protocol call: the state of a session (images, pipes) and what each call does.

The handler never holds a lock: trio runs one task at a time, and no ``await`` sits between
reading and updating the tables. The only call that waits for a producer is FinishPipe, and it
waits on the producer's ``done`` event, never on anything the receive loop needs.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

import protocol
from protocol.codec import encode_reply
from protocol.digests import DigestVerifier
from protocol.errors import ProtocolViolation, ProxyError
from protocol.extensions import SERVER_EXTENSIONS
from protocol.messages import Reply, Request
from protocol.methods import METHODS, parse_args
from protocol.session_settings import SessionSettings
from proxy.cache.source import CachingSource
from proxy.common.pipes import PIPE_DEFAULT_SIZE
from proxy.http.errors import HTTPError
from proxy.image import gojson
from proxy.image import manifest as mf
from proxy.policy.errors import PolicyRejected
from proxy.server.limits import Account, Ledger, Resource
from proxy.server.metrics import Client, Transfer
from proxy.server.options import ProxyOptions
from proxy.server.resources import SharedResources
from proxy.server.transfers import tracked
from proxy.server.transports import open_source
from proxy.sources.base import Blob, BytesBlob, ImageNotFound, ImageSource
from proxy.transfer.pipe import Pipe, from_http
from proxy.transfer.producers import produce_blob, produce_bytes, produce_raw_blob

if TYPE_CHECKING:
    from proxy.partial import service as partial
    from proxy.registry.client import RegistryClient

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the largest config blob GetConfig / GetFullConfig will read into memory
MAX_CONFIG_SIZE = 32 << 20


@attrs.frozen
class Outcome:
    """What a call produced: the reply and the fds to send with it (closed after sending)."""

    reply: Reply | None
    fds: tuple[int, ...] = ()


@attrs.define(eq=False)
class OpenedImage:
    reference: str
    source: ImageSource
    manifest: bytes  # the chosen per-platform manifest, original bytes
    manifest_mime: str
    manifest_digest: str
    parsed: mf.ImageManifest
    #: (digest, bytes) of the OCI config a converted manifest names; the source does not store it
    converted_config: tuple[str, bytes] | None = None


def _failure(request: Request, error: ProxyError) -> Outcome:
    """The error reply for a request that failed with ``error``."""
    log.debug("%s failed: %s", request.method, error)
    return Outcome(Reply.failure(error.message, error.code))


#: the methods :meth:`Handler.answer_now` may answer without waiting
_ANSWERED_NOW = frozenset({"GetManifest", "FinishPipe"})


class Handler:
    """The protocol methods of one session. ``spawn`` starts producer tasks in the session nursery."""

    def __init__(
        self,
        config: ProxyOptions,
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        resources: SharedResources | None = None,
        account: Account | None = None,
        on_idle: Callable[[], None] | None = None,
        client: Client | None = None,
    ) -> None:
        """``spawn`` starts this session's producers; ``resources`` are shared with other sessions (None: local
        transports only, no cache); ``account`` counts what this connection holds against its limits and its
        user's (default: this connection's limits only); ``on_idle`` is called when a transfer ends (a daemon's
        shutdown waits for the last one); ``client`` is who is connected (for transfers' log lines and GetStatus)."""
        self.config = config
        self._client = client
        self._resources = resources
        self._store = resources.store if resources is not None else None
        self._spawn = spawn
        self._initialized = False
        self._images: dict[int, OpenedImage] = {}
        self._next_image_id = 1
        self._pipes: dict[int, Pipe] = {}
        #: pipe -> the FinishPipe waiting for it (None: one run without being seen arriving)
        self._finishing: dict[int, Request | None] = {}
        self._raw_transfers = 0  # GetRawBlob producers running (their pipes have no pipeid)
        self._account = account if account is not None else Ledger().account(None, config.limits)
        self._on_idle = on_idle or (lambda: None)
        #: the registry client of a connection that brought its own settings (SetSessionSettings), and whether a
        #: registry client was handed out already (settings come before that, or not at all)
        self._session_registry: RegistryClient | None = None
        self._registry_used = False
        #: one method per call of the protocol's method table (``GetLayerTOC`` -> ``get_layer_toc``)
        self._methods: dict[str, Callable[..., Awaitable[Outcome]]] = {
            spec.name: getattr(self, _python_name(spec.name)) for spec in METHODS.values() if spec.replies
        }

    # ----------------------------------------------------------------- dispatch

    async def handle(self, request: Request | ProtocolViolation) -> Outcome:
        """Run one request; every failure becomes an error reply, nothing escapes but Cancelled."""
        if isinstance(request, ProtocolViolation):
            return Outcome(Reply.failure(request.message, request.code))
        try:
            spec, args = parse_args(request)
            if spec.needs_init and not self._initialized:
                raise ProxyError("client error: must invoke Initialize")
            if spec.name == "FinishPipe":
                return await self.finish_pipe(args[0], request)
            return await self._methods[spec.name](*args)
        except ProxyError as e:
            return _failure(request, e)
        except HTTPError as e:
            return _failure(request, from_http(e))
        except Exception as e:
            log.exception("%s: internal error", request.method)
            return Outcome(Reply.failure(f"internal error in {request.method}: {type(e).__name__}: {e}"))

    def answer_now(self, request: Request | ProtocolViolation) -> Outcome | None:
        """The outcome of a request that needs no waiting, computed at once: GetManifest of an image whose OCI
        manifest is in memory, FinishPipe of a pipe whose producer is done, or of a pipe another FinishPipe waits
        for (refused). None for anything else, and for anything that is not the plain case (an error, a limit):
        the session then runs it in its turn, and that path answers it. The session calls this as a request
        arrives (with an id, or in order with nothing ahead of it), so a FinishPipe that is to wait claims its pipe
        here: the first to arrive is the one that waits, whichever task starts first."""
        if not isinstance(request, Request) or request.method not in _ANSWERED_NOW or not self._initialized:
            return None
        try:
            spec, args = parse_args(request)
            if spec.name == "GetManifest":
                image = self._images.get(args[0])
                return self._stored_manifest(image) if image is not None else None
            pipeid = args[0]
            pipe = self._pipes.get(pipeid)
            if pipe is None:
                return None
            if pipeid in self._finishing:
                return _failure(request, _already_finishing(pipeid))
            if not pipe.done.is_set():
                self._finishing[pipeid] = request  # this request runs next for it (a task, or the dispatcher)
                return None
        except ProxyError:
            return None
        try:
            return self._finished(pipe)
        except ProxyError as e:
            return _failure(request, e)

    # ----------------------------------------------------------------- helpers

    def _image(self, image_id: int) -> OpenedImage:
        if image_id == 0:
            raise ProxyError("invalid imageid value of zero")
        image = self._images.get(image_id)
        if image is None:
            raise ProxyError(f"no image {image_id}")
        return image

    @property
    def transfers_in_flight(self) -> bool:
        """Pipes handed out and not finished yet, or GetRawBlob transfers still running."""
        return bool(self._pipes) or self._raw_transfers > 0

    async def _transfer(
        self,
        opener: Callable[[], Awaitable[T]],
        value: Callable[[T], Any],
        produce: Callable[[Pipe, T], Awaitable[None]],
    ) -> Outcome:
        """Reply with a pipe that ``produce`` fills from what ``opener`` opened (a blob, ranges, bytes).

        The pipe is counted against the limits before anything is opened, and every failure on the way (a limit,
        an error of the source, no fd left for the pipe, a cancellation) closes what was opened and gives the
        count back; from the reply on, the producer owns it."""
        self._account.take(Resource.PIPES)
        opened: T | None = None
        try:
            opened = await opener()
            pipe = Pipe.create()
        except BaseException:
            self._account.give(Resource.PIPES)
            await _close_quietly(opened)
            raise
        self._pipes[pipe.pipeid] = pipe
        self._spawn(lambda: produce(pipe, opened))
        return Outcome(Reply.ok(value(opened), pipeid=pipe.pipeid), (pipe.read_fd,))

    def _reply_with_bytes(self, value: Any, data: bytes) -> Outcome:
        """Reply with a pipe carrying ``data`` (synchronous: nothing to open, nothing awaited before the reply).

        Data that fits in a new pipe (a manifest, a config: almost always) is written into it here and the pipe is
        finished before the reply: no producer task and no enlarged buffer. Anything longer, or what the pipe did
        not take, goes to a producer."""
        small = len(data) <= PIPE_DEFAULT_SIZE
        self._account.take(Resource.PIPES)
        try:
            pipe = Pipe.create(enlarge=not small)
        except BaseException:
            self._account.give(Resource.PIPES)
            raise
        self._pipes[pipe.pipeid] = pipe
        written = pipe.write_now(data) if small else 0
        if written == len(data):
            pipe.finish(None)
        else:
            rest = data[written:]
            self._spawn(lambda: produce_bytes(pipe, rest))
        return Outcome(Reply.ok(value, pipeid=pipe.pipeid), (pipe.read_fd,))

    def _end_pipe(self, pipe: Pipe) -> None:
        """A handed-out pipe is done with (finished, or the session ends): close our end, give back its count
        (once, whoever comes first)."""
        if self._pipes.pop(pipe.pipeid, None) is None:
            return
        self._account.give(Resource.PIPES)
        self._on_idle()
        pipe.close()

    async def _read_config(self, image: OpenedImage) -> bytes:
        """The image's config blob, verified; refused for OCI artifacts (no image config)."""
        try:
            mf.require_image_config(image.parsed)
        except mf.ManifestError as e:
            raise ProxyError(f"{image.reference}: {e}") from None
        desc = image.parsed.config
        if desc.size > MAX_CONFIG_SIZE:
            raise ProxyError(
                f"{image.reference}: config {desc.digest} is {desc.size} bytes, over the {MAX_CONFIG_SIZE} limit"
            )
        blob = await self._open_blob(image, desc.digest, desc.size)  # through the cache, like any blob
        verifier = DigestVerifier(desc.digest)
        chunks = []
        async with blob:
            while chunk := await blob.read(1 << 20):
                verifier.update(chunk)
                chunks.append(chunk)
                if verifier.size > MAX_CONFIG_SIZE:
                    raise ProxyError(f"{image.reference}: config {desc.digest} exceeds {MAX_CONFIG_SIZE} bytes")
        if not verifier.matches():
            raise ProxyError(f"{image.reference}: config blob does not match its digest {desc.digest}")
        return b"".join(chunks)

    # ----------------------------------------------------------------- methods

    async def initialize(self) -> Outcome:
        if self._initialized:
            raise ProxyError("already initialized")
        self._initialized = True
        return Outcome(Reply.ok(protocol.PROTOCOL_VERSION))

    async def get_capabilities(self) -> Outcome:
        return Outcome(Reply.ok(list(SERVER_EXTENSIONS)))

    async def set_session_settings(self, settings: SessionSettings) -> Outcome:
        """Extension ``session-settings``: this connection's credentials and user agent (a relay forwards its agent's
        flags). Once, before anything was opened. Credentials given replace the process's for this connection only:
        its own client (shared connections, its own tokens), no auth file, helper or environment of the process's."""
        if self._session_registry is not None or self._registry_used:
            raise ProxyError("SetSessionSettings: only once per connection, before the first OpenImage")
        if self._resources is None:
            raise ProxyError("SetSessionSettings: this proxy serves local transports only; it has no registry")
        credentials = self.config.credentials
        if settings.own_credentials:
            from proxy.config import ConfigError, CredentialSource

            try:
                credentials = CredentialSource.of_client(**settings.credential_fields())
            except ConfigError as e:
                raise ProxyError(f"SetSessionSettings: {e}") from None
        self._session_registry = self._resources.registry.for_session(credentials, settings.user_agent_prefix)
        log.debug("%s: session settings %s", self._client or "client", settings)
        return Outcome(Reply.ok(None))

    async def _open(self, reference: str, optional: bool) -> Outcome:
        try:
            self._account.take(Resource.IMAGES)
        except ProxyError as e:
            raise ProxyError(f"cannot open {reference}: {e.message}", e.code) from None
        try:
            image = await self._open_image(reference)
        except ImageNotFound as e:
            self._account.give(Resource.IMAGES)
            if optional:
                log.debug("OpenImageOptional %s: not found: %s", reference, e)
                return Outcome(Reply.ok(0))
            raise
        except BaseException:
            self._account.give(Resource.IMAGES)
            raise
        image_id = self._next_image_id
        self._next_image_id += 1
        self._images[image_id] = image
        log.debug("opened %s as image %d (manifest %s)", reference, image_id, image.manifest_digest)
        return Outcome(Reply.ok(image_id))

    def _registry(self) -> RegistryClient | None:
        """This connection's registry client (SetSessionSettings), else the shared one (made when a docker:// image is
        first opened); None without resources."""
        self._registry_used = True
        if self._session_registry is not None:
            return self._session_registry
        return self._resources.registry if self._resources is not None else None

    async def _open_image(self, reference: str) -> OpenedImage:
        source = await open_source(reference, self.config.source_options, self._registry)
        try:
            if not source.stores_signatures:
                # nothing signed to read: the policy decides now, before any manifest or blob of it is read (an
                # archive's content is not touched for an image the policy refuses)
                await self.config.policy.check(reference, source, b"{}", None)
            image = await self._resolve(reference, source)
        except BaseException:
            await _close_quietly(source)
            raise
        if self._store is not None and source.cache_key is not None:
            # its blobs go through the cache from now on: served from disk, or downloaded once into it, that
            # download shared only by clients naming the same registry (none waits on a registry it did not name)
            caching = CachingSource(source, self._store, self._resources.spawn)
            caching.trusted_sizes = {d.digest: d.size for d in (image.parsed.config, *image.parsed.layers)}
            image.source = caching
        return image

    async def _resolve(self, reference: str, source: ImageSource) -> OpenedImage:
        try:
            raw, mime = await source.get_manifest(None)
            top, chosen = raw, None
            if mf.is_list(mime):
                instance = mf.choose_instance(raw, mime, self.config.platforms)
                raw, mime = await source.get_manifest(instance)
                if mf.digest_of(raw, instance.split(":", 1)[0]) != instance:
                    raise ProxyError(f"manifest {instance} chosen from the list does not match its digest")
                chosen = (instance, raw)
            # signature policy (protocol 0.2.6): the list or the chosen instance must be accepted
            await self.config.policy.check(reference, source, top, chosen)
            parsed = mf.parse_image_manifest(raw, mime)
        except mf.ManifestError as e:
            raise ProxyError(f"{reference}: {e}") from None
        return OpenedImage(
            reference=reference,
            source=source,
            manifest=raw,
            manifest_mime=mime,
            manifest_digest=mf.manifest_digest(raw),
            parsed=parsed,
        )

    async def open_image(self, reference: str) -> Outcome:
        return await self._open(reference, optional=False)

    # -- the stored manifest or index (docs/PROTOCOL.md: raw-manifest) ------------------------------

    async def get_raw_manifest(self, reference: str) -> Outcome:
        """The top-level manifest of ``reference`` (an index or manifest list as such) exactly as its source
        stores it, with its digest and MIME type; no platform is chosen. The source is open for this call only
        and counts as an open image meanwhile."""
        try:
            self._account.take(Resource.IMAGES)
        except ProxyError as e:
            raise ProxyError(f"cannot open {reference}: {e.message}", e.code) from None
        try:
            source = await open_source(reference, self.config.source_options, self._registry)
            try:
                raw, mime = await self._accepted_top_manifest(reference, source)
            finally:
                await _close_quietly(source)
        finally:
            self._account.give(Resource.IMAGES)
        return self._reply_with_bytes({"digest": mf.manifest_digest(raw), "media_type": mime}, raw)

    async def _accepted_top_manifest(self, reference: str, source: ImageSource) -> tuple[bytes, str]:
        """The source's top-level manifest once the signature policy accepts the image, as OpenImage decides: the
        manifest itself, or, for a list the policy does not accept as such, its instance for this host's
        platform (when it has one)."""
        policy = self.config.policy
        if not source.stores_signatures:
            await policy.check(reference, source, b"{}", None)  # decided before anything of it is read
            return await source.get_manifest(None)
        raw, mime = await source.get_manifest(None)
        try:
            await policy.check(reference, source, raw, None)
        except PolicyRejected as rejected:
            if not mf.is_list(mime):
                raise
            try:
                instance = mf.choose_instance(raw, mime, self.config.platforms)
            except mf.ManifestError:
                raise rejected from None  # no instance for this host: the list's own rejection says why
            chosen, _ = await source.get_manifest(instance)
            if mf.digest_of(chosen, instance.split(":", 1)[0]) != instance:
                raise ProxyError(f"manifest {instance} chosen from the list does not match its digest") from None
            await policy.check(reference, source, raw, (instance, chosen))
        return raw, mime

    async def open_image_optional(self, reference: str) -> Outcome:
        return await self._open(reference, optional=True)

    async def close_image(self, image_id: int) -> Outcome:
        image = self._image(image_id)
        del self._images[image_id]
        self._account.give(Resource.IMAGES)
        with trio.CancelScope(shield=True):
            await image.source.aclose()
        return Outcome(Reply.ok())

    def _stored_manifest(self, image: OpenedImage) -> Outcome | None:
        """GetManifest's reply when the image's manifest is OCI already (served as stored), else None."""
        if image.manifest_mime != mf.OCI_MANIFEST:
            return None
        return self._reply_with_bytes(image.manifest_digest, image.manifest)

    async def get_manifest(self, image_id: int) -> Outcome:
        image = self._image(image_id)
        stored = self._stored_manifest(image)
        if stored is not None:
            return stored
        # Converting to OCI re-serializes the config too: the converted manifest names that config,
        # so remember it and serve it to GetBlob (skopeo fails there: the source does not have it).
        original = await self._read_config(image)
        with _naming(image):
            config = mf.oci_full_config(original)
            data = mf.to_oci_manifest(image.manifest, image.manifest_mime, original)
        image.converted_config = (mf.digest_of(config), config)
        return self._reply_with_bytes(image.manifest_digest, data)

    async def get_config(self, image_id: int) -> Outcome:
        image = self._image(image_id)
        original = await self._read_config(image)
        with _naming(image):
            data = mf.oci_runtime_config(original)
        return self._reply_with_bytes(None, data)

    async def get_full_config(self, image_id: int) -> Outcome:
        image = self._image(image_id)
        original = await self._read_config(image)
        with _naming(image):
            data = mf.oci_full_config(original)
        return self._reply_with_bytes(None, data)

    async def get_layer_info(self, image_id: int) -> Outcome:
        image = self._image(image_id)
        infos = mf.layer_infos(image.parsed)
        reply = Reply.ok(infos)
        try:
            encode_reply(reply)
        except ValueError:
            raise ProxyError(
                f"{image.reference}: layer info of {len(infos)} layers does not fit in one packet; "
                "use GetLayerInfoPiped"
            ) from None
        return Outcome(reply)

    async def get_layer_info_piped(self, image_id: int) -> Outcome:
        image = self._image(image_id)
        data = gojson.marshal(mf.layer_infos(image.parsed))
        return self._reply_with_bytes(None, data)

    async def _open_blob(self, image: OpenedImage, digest: str, expected_size: int | None = None) -> Blob:
        if image.converted_config is not None and image.converted_config[0] == digest:
            return BytesBlob(image.converted_config[1])
        return await image.source.open_blob(digest, expected_size)

    @staticmethod
    def _stored_blobs(image: OpenedImage) -> list[mf.Descriptor]:
        """The blobs the image's source holds: its layers, and its config unless we made it by conversion (a
        small one is where a host's multi-range support is probed, see proxy/partial/fetch.py)."""
        config = [] if image.converted_config is not None else [image.parsed.config]
        return [*config, *image.parsed.layers]

    @staticmethod
    def _known_size(image: OpenedImage, digest: str) -> int | None:
        """The size the image's manifest gives for a blob, if it names it."""
        for desc in (image.parsed.config, *image.parsed.layers):
            if desc.digest == digest:
                return desc.size
        return None

    async def get_blob(self, image_id: int, digest: str, size: int) -> Outcome:
        image = self._image(image_id)
        transfer = Transfer("GetBlob", image.reference, digest, self._client, size)

        async def produce(pipe: Pipe, blob: Blob) -> None:
            async def work() -> ProxyError | None:
                await produce_blob(pipe, blob, digest, size, transfer.moved)
                return pipe.error

            await tracked(transfer, blob, work)

        return await self._transfer(lambda: self._open_blob(image, digest, size), lambda blob: blob.size, produce)

    # -- partial access (docs/PROTOCOL.md: blob-ranges, layer-toc) -----------------------------------

    async def get_blob_at(self, image_id: int, digest: str, ranges: list[tuple[int, int]]) -> Outcome:
        from proxy.partial import service as partial  # the partial-access stack: imported when first asked for
        from proxy.partial.planner import ByteRange

        image = self._image(image_id)
        what = f"{image.reference}: blob {digest}"
        wanted = [ByteRange(offset, length) for offset, length in ranges]
        return await self._transfer(
            lambda: partial.open_ranges(
                image.source, digest, self._known_size(image, digest), what, self._stored_blobs(image)
            ),
            lambda _source: sum(r.length for r in wanted),
            lambda pipe, source: partial.produce_ranges(pipe, source, wanted),
        )

    def _layer(self, image: OpenedImage, digest: str) -> partial.Layer:
        from proxy.partial import service as partial  # the partial-access stack: imported when first asked for

        desc = partial.find_layer(image.parsed, digest, image.reference)
        what = f"{image.reference}: layer {digest}"
        return partial.Layer(
            what=what,
            digest=digest,
            descriptor=desc,
            open_ranges=lambda: partial.open_ranges(image.source, digest, desc.size, what),
            open_whole=lambda: self._open_blob(image, digest, desc.size),
        )

    async def get_layer_toc(self, image_id: int, digest: str) -> Outcome:
        from proxy.partial import service as partial  # the partial-access stack: imported when first asked for

        image = self._image(image_id)
        toc = await partial.layer_toc(self._layer(image, digest))
        return self._reply_with_bytes(toc.format.value, toc.data)

    async def get_layer_tar_split(self, image_id: int, digest: str) -> Outcome:
        from proxy.partial import service as partial  # the partial-access stack: imported when first asked for

        image = self._image(image_id)
        layer = self._layer(image, digest)
        toc = await partial.layer_toc(layer, with_tar_split=True)
        assert toc.tar_split is not None and toc.location.tar_split is not None
        size = toc.location.tar_split.uncompressed
        compressed = toc.tar_split

        async def nothing_to_open() -> None:
            return None

        return await self._transfer(
            nothing_to_open,
            lambda _: size if size is not None else -1,
            lambda pipe, _: partial.produce_tar_split(pipe, layer.what, compressed),
        )

    async def get_raw_blob(self, image_id: int, digest: str) -> Outcome:
        image = self._image(image_id)
        self._account.take(Resource.PIPES)  # both pipes of a raw transfer count as one, until the producer ends
        blob: Blob | None = None
        pipes: list[Pipe] = []
        try:
            blob = await self._open_blob(image, digest, self._known_size(image, digest))
            pipes.append(Pipe.create())
            pipes.append(Pipe.create())
        except BaseException:
            self._account.give(Resource.PIPES)
            for pipe in pipes:
                pipe.close_now()
            await _close_quietly(blob)
            raise
        data_pipe, err_pipe = pipes
        self._raw_transfers += 1
        transfer = Transfer("GetRawBlob", image.reference, digest, self._client, blob.size)

        async def produce() -> None:
            try:
                await tracked(
                    transfer,
                    blob,
                    lambda: produce_raw_blob(blob, digest, data_pipe.writer, err_pipe.writer, transfer.moved),
                )
            finally:
                self._raw_transfers -= 1
                self._account.give(Resource.PIPES)
                self._on_idle()

        self._spawn(produce)
        return Outcome(Reply.ok(blob.size), (data_pipe.read_fd, err_pipe.read_fd))

    # -- what the process is doing (docs/PROTOCOL.md: status) ----------------------------------------------

    async def get_status(self) -> Outcome:
        """The connections, transfers in flight, cache, limits and uptime of this process, as a JSON document in a
        pipe; other users' clients only for the process's own user and root (proxy/server/status.py)."""
        from proxy.server import status  # imported when first asked for

        document = await status.document(self.config, self._store, self._client, self._account.daemon_limits)
        return self._reply_with_bytes(None, document)

    def image_reference(self, image_id: object) -> str | None:
        """The reference of an open image id, for a failed request's log line (None: no such image)."""
        image = self._images.get(image_id) if isinstance(image_id, int) else None
        return image.reference if image is not None else None

    async def finish_pipe(self, pipeid: int, request: Request | None = None) -> Outcome:
        """Wait for the pipe's producer; ``request``: the FinishPipe itself, which may have claimed the pipe as it
        arrived (``answer_now``; ``handle`` passes it)."""
        pipe = self._pipes.get(pipeid)
        if pipe is None:
            raise ProxyError(f"finishpipe: no active pipe {pipeid}")
        if pipeid in self._finishing and (request is None or self._finishing[pipeid] is not request):
            raise _already_finishing(pipeid)
        self._finishing[pipeid] = request
        try:
            await pipe.done.wait()
        finally:
            self._finishing.pop(pipeid, None)
        # The pipe may have been finished meanwhile only by session teardown, which cancels us.
        return self._finished(pipe)

    def _finished(self, pipe: Pipe) -> Outcome:
        """FinishPipe's reply for a pipe whose producer is done: the pipe is ended; its error is raised."""
        self._end_pipe(pipe)
        if pipe.error is not None:
            raise pipe.error
        return Outcome(Reply.ok())

    # ----------------------------------------------------------------- teardown

    async def aclose(self) -> None:
        """Close every pipe and image; runs shielded at session end."""
        with trio.CancelScope(shield=True):
            for pipe in list(self._pipes.values()):
                self._end_pipe(pipe)
            for image in list(self._images.values()):
                self._account.give(Resource.IMAGES)
                try:
                    await image.source.aclose()
                except Exception:
                    log.exception("closing %s", image.reference)
            self._images.clear()


def _already_finishing(pipeid: int) -> ProxyError:
    return ProxyError(f"finishpipe: pipe {pipeid} is already being finished by another request")


def _python_name(method: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", method).lower()


@contextlib.contextmanager
def _naming(image: OpenedImage) -> Iterator[None]:
    """A manifest or config that cannot be converted: the error names the image."""
    try:
        yield
    except mf.ManifestError as e:
        raise ProxyError(f"{image.reference}: {e}") from None


async def _close_quietly(opened: object) -> None:
    """Close what a failed request opened (a blob, a source, ranges); never raises, never cancelled."""
    aclose = getattr(opened, "aclose", None)
    if aclose is None:
        return
    with trio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:
            log.exception("closing %r after a failed request", opened)


__all__ = ["Handler", "Outcome"]
