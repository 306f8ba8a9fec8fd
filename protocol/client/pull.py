"""Pull a whole image through the client bindings: manifest, config and every layer, verified, into sinks.

::

    async with ImageProxy.spawn() as proxy:
        image = await pull(proxy, "docker://quay.io/fedora/fedora:40", sinks, on_event=print)

    image = pull_sync("oci:examples/hello:latest", sinks)  # for scripts

``sinks(blob)`` is called once per attempt at a blob and returns a :class:`BlobWriter` (``write`` each chunk,
then ``commit`` once size and digest are verified, or ``discard``), or None when the destination already holds
that blob. Layers are fetched concurrently, at most ``concurrency`` at a time: with a server that offers
request ids (ours) they overlap completely; with an in-order server (skopeo's) their transfers overlap but each
FinishPipe holds back the calls sent after it.

Every blob is checked here too (size and sha256/sha512 digest of the bytes written), on top of the server's own
check, so a sink never commits anything unverified.

What happens is reported through ``on_event(event)``, one of the ``*Event`` classes below (each has ``kind`` and
``as_json()``). Retries and resumes, as far as the client can know them:

- the protocol carries no news of the daemon's own resumes (a stalled registry read is resumed inside the
  daemon with a Range request, invisibly on the wire); what the client sees is a gap in the bytes. A gap longer
  than ``stall_notice`` seconds is reported as :class:`BlobStalled`, and the first bytes after it as
  :class:`BlobFlowing`, so a person sees "stalled 12 s" while the daemon resumes;
- a blob whose transfer fails with a ``retryable`` error (the daemon gave up after its own resumes, a 5xx,
  a network error) is fetched again from the start, up to ``retries`` times, after a short backoff:
  :class:`BlobRetrying` says which blob, which attempt, and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Protocol

import attrs
import trio

from protocol.client import ImageProxy
from protocol.client.tasks import failing_fast
from protocol.digests import digest_of, is_valid_digest
from protocol.errors import ErrorCode, ProtocolViolation, ProxyError

DEFAULT_CONCURRENCY = 4
DEFAULT_RETRIES = 2
#: no byte of a blob for this long is reported as a stall (the daemon's own stall deadline is 30 s by default)
DEFAULT_STALL_NOTICE = 5.0
#: the wait before the first retry of a blob; doubled for each further one
RETRY_BACKOFF = 1.0


class PullError(ProxyError):
    """A pull failed; the message names the image and, for a blob, its digest."""


@attrs.frozen
class BlobDescriptor:
    """One blob of the image: the config or a layer, as the manifest describes it."""

    digest: str
    size: int
    media_type: str
    #: "config" or "layer"
    role: str
    #: the layer's position in the manifest (0 for the config)
    index: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "media_type": self.media_type, "role": self.role}


class BlobWriter(Protocol):
    """Where one attempt at a blob goes. Each method may be a coroutine function or a plain one. A writer that is
    a file may also have ``fileno()``: with ``verify=False`` the bytes are then spliced into that fd (at its
    current offset) instead of passed to ``write``."""

    def write(self, chunk: bytes) -> Awaitable[None] | None: ...

    def commit(self) -> Awaitable[None] | None: ...

    def discard(self) -> Awaitable[None] | None: ...


#: ``sinks(blob)``: a writer for one attempt at ``blob``, or None to skip a blob the destination already has
BlobSinks = Callable[[BlobDescriptor], "BlobWriter | Awaitable[BlobWriter | None] | None"]


# ------------------------------------------------------------------------------------------------ events


@attrs.frozen
class PullStarted:
    kind = "pull-started"
    reference: str
    manifest_digest: str
    blobs: tuple[BlobDescriptor, ...]
    total_bytes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "reference": self.reference,
            "manifest_digest": self.manifest_digest,
            "blobs": [b.as_json() for b in self.blobs],
            "total_bytes": self.total_bytes,
        }


@attrs.frozen
class BlobStarted:
    kind = "blob-started"
    blob: BlobDescriptor
    attempt: int

    def as_json(self) -> dict[str, Any]:
        return {"event": self.kind, **self.blob.as_json(), "attempt": self.attempt}


@attrs.frozen
class BlobProgress:
    kind = "blob-progress"
    blob: BlobDescriptor
    #: bytes of this blob received in this attempt
    done: int

    def as_json(self) -> dict[str, Any]:
        return {"event": self.kind, "digest": self.blob.digest, "done": self.done, "size": self.blob.size}


@attrs.frozen
class _Gap:
    """A pause in a blob's bytes: ``done`` bytes received so far, ``seconds`` of silence."""

    kind: ClassVar[str]
    blob: BlobDescriptor
    done: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "digest": self.blob.digest,
            "done": self.done,
            "seconds": round(self.seconds, 1),
        }


@attrs.frozen
class BlobStalled(_Gap):
    """No byte of the blob for ``seconds`` (the daemon is probably resuming the transfer)."""

    kind = "blob-stalled"


@attrs.frozen
class BlobFlowing(_Gap):
    """Bytes arrive again after a :class:`BlobStalled`; ``seconds`` is how long the gap lasted."""

    kind = "blob-flowing"


@attrs.frozen
class BlobRetrying:
    """Attempt ``attempt`` failed with a retryable error; the blob is fetched again after ``delay`` seconds."""

    kind = "blob-retrying"
    blob: BlobDescriptor
    attempt: int
    error: str
    delay: float

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "digest": self.blob.digest,
            "attempt": self.attempt,
            "error": self.error,
            "delay": self.delay,
        }


@attrs.frozen
class BlobSkipped:
    """The destination already holds the blob."""

    kind = "blob-skipped"
    blob: BlobDescriptor

    def as_json(self) -> dict[str, Any]:
        return {"event": self.kind, **self.blob.as_json()}


@attrs.frozen
class BlobFinished:
    kind = "blob-finished"
    blob: BlobDescriptor
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"event": self.kind, **self.blob.as_json(), "seconds": round(self.seconds, 3)}


@attrs.frozen
class PullFinished:
    kind = "pull-finished"
    reference: str
    manifest_digest: str
    #: bytes fetched (skipped blobs not counted)
    fetched_bytes: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "reference": self.reference,
            "manifest_digest": self.manifest_digest,
            "fetched_bytes": self.fetched_bytes,
            "seconds": round(self.seconds, 3),
        }


PullEvent = (
    PullStarted
    | BlobStarted
    | BlobProgress
    | BlobStalled
    | BlobFlowing
    | BlobRetrying
    | BlobSkipped
    | BlobFinished
    | PullFinished
)


@attrs.frozen
class PulledImage:
    """What was pulled. ``manifest_digest`` is the server's (the per-platform manifest's digest, as skopeo
    reports it); ``manifest`` is the OCI manifest the server sent, stored under ``stored_manifest_digest``
    (its own sha256). They differ when the server converted a Docker schema2 manifest to OCI."""

    reference: str
    manifest_digest: str
    manifest: bytes
    stored_manifest_digest: str
    config: BlobDescriptor
    layers: tuple[BlobDescriptor, ...]
    fetched_bytes: int

    @property
    def blobs(self) -> tuple[BlobDescriptor, ...]:
        return (self.config, *self.layers)

    @property
    def converted(self) -> bool:
        return self.manifest_digest != self.stored_manifest_digest


# ------------------------------------------------------------------------------------------------ the pull


def parse_manifest(reference: str, manifest: bytes) -> tuple[BlobDescriptor, tuple[BlobDescriptor, ...]]:
    """The config and layers an OCI image manifest names; PullError for anything else."""
    try:
        doc = json.loads(manifest)
        config = doc["config"]
        layers = doc.get("layers") or []
        blobs = [_descriptor(config, "config", 0)]
        blobs += [_descriptor(layer, "layer", i) for i, layer in enumerate(layers)]
    except (ValueError, KeyError, TypeError) as e:
        raise PullError(f"{reference}: the manifest is not an image manifest the pull understands: {e}") from None
    return blobs[0], tuple(blobs[1:])


def _descriptor(doc: dict[str, Any], role: str, index: int) -> BlobDescriptor:
    digest, size = doc["digest"], doc["size"]
    if not is_valid_digest(digest):
        raise ValueError(f"unsupported or malformed digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"bad size {size!r} for {digest}")
    return BlobDescriptor(digest, size, str(doc.get("mediaType", "")), role, index)


def _about(reference: str, text: str) -> str:
    """An error text that names the image (once)."""
    return text if reference in text else f"{reference}: {text}"


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _Emitter:
    def __init__(self, on_event: Callable[[PullEvent], Any] | None) -> None:
        self._on_event = on_event

    async def __call__(self, event: PullEvent) -> None:
        if self._on_event is not None:
            await _maybe_await(self._on_event(event))


async def pull(
    proxy: ImageProxy,
    reference: str,
    sinks: BlobSinks,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_event: Callable[[PullEvent], Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    stall_notice: float = DEFAULT_STALL_NOTICE,
    verify: bool = True,
) -> PulledImage:
    """Open ``reference``, read its manifest, then fetch the config and all layers (at most ``concurrency`` at
    once) into ``sinks``; returns what was pulled. The image is closed again, whatever happens. Raises
    PullError (or the ProxyError of the call that failed) naming the image and the blob.

    ``verify=False`` skips the client's own digest check: the size is still checked here, and the server checks
    size and digest before FinishPipe succeeds (image-proxy and skopeo's proxy both do for GetBlob), so a blob
    is committed only once verified, by the server. A writer with ``fileno()`` then gets the bytes by splice(2),
    without their passing through Python (what ``image-proxy copy`` does)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    emit = _Emitter(on_event)
    started = time.monotonic()
    try:
        image_id = await proxy.open_image(reference)
    except ProxyError as e:
        raise PullError(_about(reference, str(e)), e.code) from None
    try:
        manifest_digest, manifest = await proxy.get_manifest(image_id)
        config, layers = parse_manifest(reference, manifest)
        blobs = (config, *layers)
        await emit(PullStarted(reference, manifest_digest, blobs, sum(b.size for b in blobs)))
        fetched = 0
        limiter = trio.CapacityLimiter(concurrency)

        async def one(blob: BlobDescriptor) -> None:
            nonlocal fetched
            async with limiter:
                got = await _fetch_blob(proxy, image_id, reference, blob, sinks, emit, retries, stall_notice, verify)
                fetched += got  # not "fetched += await ...": that would read fetched before the wait

        async with failing_fast() as nursery:  # the first failure cancels the rest and is raised as itself
            for blob in blobs:
                nursery.start_soon(one, blob)
        await emit(PullFinished(reference, manifest_digest, fetched, time.monotonic() - started))
        return PulledImage(reference, manifest_digest, manifest, digest_of(manifest), config, layers, fetched)
    except ProxyError as e:
        if isinstance(e, PullError):
            raise
        raise PullError(_about(reference, str(e)), e.code) from None
    finally:
        # the connection may be gone or the image already closed: nothing left to release then
        with trio.CancelScope(shield=True), trio.move_on_after(10), contextlib.suppress(ProxyError):
            await proxy.close_image(image_id)


async def _fetch_blob(
    proxy: ImageProxy,
    image_id: int,
    reference: str,
    blob: BlobDescriptor,
    sinks: BlobSinks,
    emit: _Emitter,
    retries: int,
    stall_notice: float,
    verify: bool,
) -> int:
    """Fetch one blob (with retries); returns the bytes fetched, 0 when the sink already had it."""
    for attempt in range(1, retries + 2):
        writer = await _maybe_await(sinks(blob))
        if writer is None:
            await emit(BlobSkipped(blob))
            return 0
        await emit(BlobStarted(blob, attempt))
        started = time.monotonic()
        try:
            await _transfer(proxy, image_id, blob, writer, emit, stall_notice, verify)
        except ProxyError as e:
            with trio.CancelScope(shield=True):
                await _maybe_await(writer.discard())
            # skopeo's proxy cannot GetBlob the config of a converted Docker schema2 image; its full config is
            # the same document when it hashes to the digest the manifest names.
            if (
                blob.role == "config"
                and e.code is not ErrorCode.RETRYABLE
                and await _config_from_full_config(proxy, image_id, blob, sinks)
            ):
                await emit(BlobFinished(blob, time.monotonic() - started))
                return blob.size
            if e.code is not ErrorCode.RETRYABLE or attempt > retries:
                raise PullError(f"{reference}: {blob.role} {blob.digest}: {e}", e.code) from None
            delay = RETRY_BACKOFF * 2 ** (attempt - 1)
            await emit(BlobRetrying(blob, attempt, str(e), delay))
            await trio.sleep(delay)
            continue
        except BaseException:
            with trio.CancelScope(shield=True):
                await _maybe_await(writer.discard())
            raise
        await _maybe_await(writer.commit())
        await emit(BlobFinished(blob, time.monotonic() - started))
        return blob.size
    raise AssertionError("unreachable")  # pragma: no cover


async def _config_from_full_config(proxy: ImageProxy, image_id: int, blob: BlobDescriptor, sinks: BlobSinks) -> bool:
    try:
        data = await proxy.get_full_config(image_id)
    except ProxyError:
        return False
    if len(data) != blob.size or digest_of(data, blob.digest.split(":", 1)[0]) != blob.digest:
        return False
    writer = await _maybe_await(sinks(blob))
    if writer is not None:
        await _maybe_await(writer.write(data))
        await _maybe_await(writer.commit())
    return True


async def _transfer(
    proxy: ImageProxy,
    image_id: int,
    blob: BlobDescriptor,
    writer: BlobWriter,
    emit: _Emitter,
    stall_notice: float,
    verify: bool,
) -> None:
    """One attempt: GetBlob into the writer, hashing (``verify``) or, when the writer is a file (``fileno()``) and
    the server's digest check is enough, spliced into it unread; a watchdog reports gaps longer than
    ``stall_notice``."""
    algorithm = blob.digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    done = 0
    last_byte = trio.current_time()
    stalled_since: float | None = None

    async def moved(count: int) -> None:
        nonlocal done, last_byte, stalled_since
        now = trio.current_time()
        if stalled_since is not None:
            await emit(BlobFlowing(blob, done, now - stalled_since))
            stalled_since = None
        last_byte = now
        done += count
        if done > blob.size:
            raise ProxyError(f"the server sent more than the {blob.size} bytes the manifest names")
        await emit(BlobProgress(blob, done))

    async def sink(chunk: bytes) -> None:
        if verify:
            hasher.update(chunk)
        await _maybe_await(writer.write(chunk))
        await moved(len(chunk))

    async def watchdog() -> None:
        nonlocal stalled_since
        while True:
            if stalled_since is None:
                await trio.sleep_until(last_byte + stall_notice)
            else:
                await trio.sleep(stall_notice)  # already reported: look again later, the gap may have ended
            now = trio.current_time()
            if stalled_since is None and now - last_byte >= stall_notice:
                stalled_since = last_byte
                await emit(BlobStalled(blob, done, now - last_byte))

    async with failing_fast() as nursery:  # a failure is raised as itself, not inside an ExceptionGroup
        if math.isfinite(stall_notice):
            nursery.start_soon(watchdog)
        try:
            fileno = getattr(writer, "fileno", None)
            if not verify and fileno is not None:  # the server's check is the one: bytes go pipe -> file unread
                await proxy.copy_blob_into(image_id, blob.digest, blob.size, fileno(), moved)
            else:
                await proxy.copy_blob(image_id, blob.digest, blob.size, sink)
        finally:
            nursery.cancel_scope.cancel()
    if done != blob.size:
        raise ProtocolViolation(f"expected {blob.size} bytes, got {done}")
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if verify and actual != blob.digest:
        raise ProtocolViolation(f"the bytes received have digest {actual}, not {blob.digest}")


# ------------------------------------------------------------------------------------------------ scripts


def pull_sync(
    reference: str,
    sinks: BlobSinks,
    *,
    argv: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    concurrency: int = DEFAULT_CONCURRENCY,
    on_event: Callable[[PullEvent], Any] | None = None,
    retries: int = DEFAULT_RETRIES,
) -> PulledImage:
    """Spawn a proxy (ours unless ``argv`` says otherwise), pull ``reference`` into ``sinks``, shut it down."""

    async def main() -> PulledImage:
        async with ImageProxy.spawn(argv, extra_args) as proxy:
            return await pull(proxy, reference, sinks, concurrency=concurrency, on_event=on_event, retries=retries)

    return trio.run(main)


__all__ = [
    "DEFAULT_CONCURRENCY",
    "BlobDescriptor",
    "BlobFinished",
    "BlobFlowing",
    "BlobProgress",
    "BlobRetrying",
    "BlobSinks",
    "BlobSkipped",
    "BlobStalled",
    "BlobStarted",
    "BlobWriter",
    "PullError",
    "PullEvent",
    "PullFinished",
    "PullStarted",
    "PulledImage",
    "digest_of",
    "parse_manifest",
    "pull",
    "pull_sync",
]
