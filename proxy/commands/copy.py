"""``image-proxy copy REF oci:DIR[:TAG] | dir:DIR``: pull an image through the proxy into a layout other tools read.

The command is a client of the proxy (``protocol.client.pull`` over ``protocol.client``): it talks to the proxy
``image-proxy experimental-image-proxy`` would be with the registry flags given here, served in this process
(``proxy_access.open_proxy``), or to the daemon at ``--proxy-socket``; fetches the config and the layers
concurrently (``--jobs``), each spliced into its file and committed once the proxy verified it, and writes the
layout described in ``proxy.commands.destination``. Progress goes to stderr: bars on a terminal, lines otherwise,
JSON events on stdout with ``--json``, nothing with ``--quiet``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import trio

from protocol.client.pull import DEFAULT_CONCURRENCY, DEFAULT_RETRIES, PulledImage, pull
from protocol.client.tasks import failing_fast
from protocol.errors import ProxyError
from proxy.commands import arguments
from proxy.commands.destination import DestinationError, parse_destination
from proxy.commands.interrupts import Interrupted, run_interruptible
from proxy.commands.progress import Progress, nothing_resumed, open_progress_fd, partials_in, progress_for
from proxy.commands.proxy_access import add_proxy_flags, check_proxy_socket_flags, open_proxy, report_error

COPY_EPILOG = """\
interrupted downloads:
  Within one copy, a registry connection that stalls or breaks is resumed where it stopped (--stall-timeout,
  --max-resumes). What a copy that was ended (Ctrl-C, a reboot) had fetched is kept only with a blob cache: with
  --blob-cache DIR, or through a daemon (--proxy-socket), the next copy of the same image continues each blob
  from the bytes already in the cache instead of downloading it again. Without a cache it starts over. Blobs
  already complete in the destination are never fetched again.

examples:
  image-proxy copy docker://quay.io/fedora/fedora-coreos:stable oci:/var/tmp/fcos:stable
  image-proxy copy --blob-cache ~/.cache/image-proxy docker://registry.example/app:1.2 oci:app:1.2
  image-proxy copy --src-tls-verify=false docker://localhost:5000/test:latest dir:/tmp/test
  image-proxy copy --proxy-socket /run/image-proxy/image-proxy.sock docker://registry.example/os:42 oci:os:42
  image-proxy --policy examples/policy.json copy oci:examples/hello:latest oci:/tmp/hello:latest

global options (--policy, --override-arch, --debug, ...) may come before or after 'copy': image-proxy --help
"""
#: how often the bars are redrawn when no event comes (a stall's counter keeps moving)
TICK = 0.5


def add_copy_parser(sub: argparse._SubParsersAction, add_global_flags: Callable[..., None]) -> None:
    p = sub.add_parser(
        "copy",
        help="pull an image into an OCI layout (oci:DIR[:TAG]) or a dir: layout, verified, with progress",
        description="Pull REF through the proxy into DESTINATION: oci:DIR[:TAG] (an OCI image layout) or dir:DIR "
        "(skopeo's directory layout). A multi-platform image is copied as the instance for this host "
        "(or --override-os/--override-arch/--override-variant). Every blob is verified (size and digest) by the "
        "proxy before it is committed; blobs the destination already has are kept.",
        epilog=COPY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_flags(p, suppress=True)
    p.add_argument("reference", help="e.g. docker://registry.example/repo:tag or oci:examples/hello:latest")
    p.add_argument("destination", help="oci:DIR[:TAG] or dir:DIR")
    p.add_argument(
        "-j",
        "--jobs",
        type=arguments.whole_number(1, 64, "--jobs"),
        default=DEFAULT_CONCURRENCY,
        help=f"blobs fetched at once ({DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--retries",
        type=arguments.whole_number(0, 10, "--retries"),
        default=DEFAULT_RETRIES,
        help=f"fetch a blob again this often after a retryable failure ({DEFAULT_RETRIES})",
    )
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="progress events as JSON lines on stdout")
    output.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors")
    p.add_argument(
        "--progress-fd",
        metavar="FD",
        type=arguments.whole_number(3, None, "--progress-fd"),
        help="also write progress to the open file descriptor FD, as JSON lines in bootc's --progress-fd format",
    )
    add_proxy_flags(p, source_aliases=True)
    p.set_defaults(run=run_copy)


async def _ticker(progress: Progress) -> None:
    while True:
        await trio.sleep(TICK)
        progress.tick()


async def _copy(args: argparse.Namespace, progress: Progress) -> PulledImage:
    destination = parse_destination(args.destination)
    async with open_proxy(args) as proxy:
        await destination.prepare()
        async with failing_fast() as nursery:  # a failure is raised as itself, not in an ExceptionGroup
            nursery.start_soon(_ticker, progress)  # only the terminal's bars do anything with a tick
            try:
                image = await pull(
                    proxy,
                    args.reference,
                    destination.sink,
                    concurrency=args.jobs,
                    on_event=progress,
                    retries=args.retries,
                    verify=False,  # the proxy verified size and digest before FinishPipe succeeded
                )
            finally:
                nursery.cancel_scope.cancel()
        await destination.finish(image)
    return image


def run_copy(args: argparse.Namespace) -> int:
    def err(line: str) -> None:
        print(line, file=sys.stderr)

    problem = check_proxy_socket_flags(args)
    if problem:
        err(f"image-proxy copy: {problem}")
        return 2
    try:
        destination = parse_destination(args.destination)
    except DestinationError as e:
        err(f"image-proxy copy: {e}")
        return 2
    try:
        progress_file = open_progress_fd(args.progress_fd) if args.progress_fd is not None else None
    except OSError as e:
        err(f"image-proxy copy: {e}")
        return 2
    # the command's own proxy resumes blobs from the partial files its blob cache kept (a daemon's cache: unknown)
    resumed = partials_in(args.blob_cache) if args.blob_cache and not args.proxy_socket else nothing_resumed
    progress = progress_for(
        sys.stderr,
        json_events=args.json,
        quiet=args.quiet,
        json_stream=sys.stdout,
        progress_file=progress_file,
        resumed=resumed,
    )
    try:
        image = run_interruptible(_copy, args, progress)
    except Interrupted as e:
        progress.close()
        progress.failed(args.reference, "interrupted")
        raise e from None
    except (ProxyError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            raise
        progress.close()
        report_error("copy", e, args, err)
        progress.failed(args.reference, str(e))
        return 1
    except DestinationError as e:
        progress.close()
        err(f"image-proxy copy: {e}")
        progress.failed(args.reference, str(e))
        return 1
    progress.close()
    progress.copied(
        {
            "reference": args.reference,
            "destination": destination.description,
            "manifest_digest": image.manifest_digest,
            "stored_manifest_digest": image.stored_manifest_digest,
            "fetched_bytes": image.fetched_bytes,
        }
    )
    if not args.json and not args.quiet:
        stored = "" if not image.converted else f" (stored as {image.stored_manifest_digest}, converted to OCI)"
        print(f"Copied {args.reference} to {destination.description}: manifest {image.manifest_digest}{stored}")
    return 0
