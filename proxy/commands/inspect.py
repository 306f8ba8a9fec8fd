"""``image-proxy inspect REF`` and ``image-proxy layers REF``: what a client sees of an image, through the real
protocol.

Both are clients of the proxy (``protocol.client``): they start ``image-proxy experimental-image-proxy`` with the
registry flags given (or use the daemon at ``--proxy-socket``), so running them exercises the path an update agent
uses. The digest shown is the one GetManifest returns: for a multi-platform image, the instance chosen for this
host (or ``--override-*``); the manifest shown is the OCI manifest the proxy serves (Docker schema2 converted). For a
multi-platform image ``inspect`` also shows the index (or manifest list) itself, read with the ``raw-manifest``
extension (docs/PROTOCOL.md): its digest, the one to pin a tag by, and the platforms it offers; ``--raw`` prints
the manifest or index as stored, byte for byte what ``skopeo inspect --raw`` prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import attrs

from protocol.client.image_proxy import RAW_MANIFEST, RawManifest
from protocol.client.pull import BlobDescriptor, digest_of, parse_manifest
from protocol.errors import ProxyError
from proxy.commands.interrupts import run_interruptible
from proxy.commands.proxy_access import (
    add_proxy_flags,
    check_proxy_socket_flags,
    open_proxy,
    report_error,
)
from proxy.commands.units import format_size

#: the manifest types of an index or manifest list (the top-level manifest of a multi-platform image)
LIST_TYPES = frozenset(
    {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
)


@attrs.frozen
class Instance:
    """One entry of an index: the manifest of one platform (or an attestation, a signature...)."""

    digest: str
    media_type: str
    size: int
    platform: str  # "os/architecture[/variant]", "" when the entry has none
    annotations: dict[str, str] = attrs.field(factory=dict)

    @property
    def kind(self) -> str | None:
        """What a buildx attestation entry says it is (``vnd.docker.reference.type``), else None."""
        return self.annotations.get("vnd.docker.reference.type")

    def as_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "media_type": self.media_type,
            "size": self.size,
            "platform": self.platform or None,
            "annotations": self.annotations,
        }


@attrs.frozen
class IndexFacts:
    """The index (or Docker manifest list) a multi-platform reference names, as stored."""

    digest: str
    media_type: str
    instances: tuple[Instance, ...]


def parse_index(reference: str, raw: RawManifest) -> IndexFacts:
    """The entries of an index or manifest list; ProxyError when it is not one the command can read."""
    try:
        doc = json.loads(raw.data)
        entries = doc["manifests"] or []
        instances = tuple(_instance(entry) for entry in entries)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ProxyError(f"{reference}: the index {raw.digest} cannot be read: {e}") from None
    return IndexFacts(raw.digest, raw.media_type, instances)


def _instance(entry: dict[str, Any]) -> Instance:
    platform = entry.get("platform") or {}
    keys = ("os", "architecture", "variant")
    text = "/".join(str(platform[k]) for k in keys if platform.get(k))
    annotations = entry.get("annotations") or {}
    return Instance(str(entry["digest"]), str(entry.get("mediaType", "")), int(entry["size"]), text, annotations)


@attrs.frozen
class ImageFacts:
    reference: str
    digest: str
    manifest: bytes
    config: dict[str, Any]
    config_blob: BlobDescriptor
    layers: tuple[BlobDescriptor, ...]
    #: the index the reference names, for a multi-platform image (None: a single image, or a server without the
    #: raw-manifest extension)
    index: IndexFacts | None = None

    @property
    def platform(self) -> str:
        keys = ("os", "architecture", "variant")
        return "/".join(str(self.config[k]) for k in keys if self.config.get(k))

    def layer_history(self) -> list[str | None]:
        """The ``created_by`` of the history entry that made each layer (None where unknown)."""
        made = [h for h in self.config.get("history") or [] if isinstance(h, dict) and not h.get("empty_layer")]
        if len(made) != len(self.layers):
            return [None] * len(self.layers)
        return [h.get("created_by") for h in made]

    def diff_ids(self) -> list[str | None]:
        ids = (self.config.get("rootfs") or {}).get("diff_ids") or []
        return [*ids, *[None] * len(self.layers)][: len(self.layers)]


async def read_image(args: argparse.Namespace) -> ImageFacts | bytes:
    """Manifest, config and layers of ``args.reference``, and its index when it has one (with ``--raw``: the
    manifest or index bytes as stored; from a server without the raw-manifest extension, GetManifest's)."""
    reference = args.reference
    async with open_proxy(args) as proxy:
        raw = None
        if getattr(args, "command", "inspect") == "inspect" and RAW_MANIFEST in await proxy.get_capabilities():
            raw = await proxy.get_raw_manifest(reference)
            if getattr(args, "raw", False):
                return raw.data
        try:
            image = await proxy.open_image(reference)
        except ProxyError as e:
            if raw is None or raw.media_type not in LIST_TYPES:
                raise
            offered = ", ".join(i.platform for i in parse_index(reference, raw).instances if i.platform) or "nothing"
            raise ProxyError(f"{e}; the index {raw.digest} offers {offered}", e.code) from None
        digest, manifest = await proxy.get_manifest(image)
        if getattr(args, "raw", False):
            return manifest
        config_blob, layers = parse_manifest(reference, manifest)
        config = json.loads(await proxy.get_full_config(image))
        await proxy.close_image(image)
    index = None
    if raw is not None and raw.media_type in LIST_TYPES:
        index = parse_index(reference, raw)
        if digest not in {instance.digest for instance in index.instances}:
            # two reads of a tag that moved in between: the instance is not one of this index's
            raise ProxyError(
                f"{reference}: the image changed while it was read (index {index.digest} does not list the "
                f"instance {digest} opened after it); run the command again"
            )
    return ImageFacts(reference, digest, manifest, config, config_blob, layers, index)


def _print_index(facts: ImageFacts) -> None:
    index = facts.index
    assert index is not None
    count = len(index.instances)
    print(f"Index:       {index.digest} ({count} manifest{'s' if count != 1 else ''}, {index.media_type})")
    width = max((len(i.platform or "-") for i in index.instances), default=0)
    for instance in index.instances:
        notes = []
        if instance.digest == facts.digest:
            notes.append("shown below")
        if instance.kind:
            notes.append(instance.kind)
        note = f"  ({', '.join(notes)})" if notes else ""
        print(f"  {instance.platform or '-':<{width}}  {instance.digest}{note}")


def _print_inspect(facts: ImageFacts) -> None:
    config = facts.config
    print(f"Image:       {facts.reference}")
    if facts.index is not None:
        _print_index(facts)
    print(f"Digest:      {facts.digest}")
    if digest_of(facts.manifest) != facts.digest:
        print(f"OCI digest:  {digest_of(facts.manifest)} (the manifest as the proxy converted it to OCI)")
    print(f"Platform:    {facts.platform}")
    if config.get("created"):
        print(f"Created:     {config['created']}")
    print(f"Config:      {facts.config_blob.digest}")
    runtime = config.get("config") or {}
    for key in ("Entrypoint", "Cmd", "Env", "WorkingDir", "User"):
        if runtime.get(key):
            print(f"{key + ':':<13}{json.dumps(runtime[key])}")
    for name, value in sorted((runtime.get("Labels") or {}).items()):
        print(f"Label:       {name}={value}")
    total = sum(layer.size for layer in facts.layers)
    print(f"Layers:      {len(facts.layers)}, {format_size(total)}")
    for layer in facts.layers:
        print(f"  {layer.digest}  {format_size(layer.size):>9}  {layer.media_type}")


def _inspect_json(facts: ImageFacts) -> dict[str, Any]:
    index = facts.index
    return {
        "reference": facts.reference,
        "digest": facts.digest,
        "index_digest": index.digest if index is not None else None,
        "index_media_type": index.media_type if index is not None else None,
        "platforms": [instance.as_json() for instance in index.instances] if index is not None else [],
        "oci_manifest_digest": digest_of(facts.manifest),
        "platform": facts.platform,
        "manifest": json.loads(facts.manifest),
        "config": facts.config,
        "layers": [layer.as_json() for layer in facts.layers],
    }


def _layers_json(facts: ImageFacts) -> list[dict[str, Any]]:
    return [
        {**layer.as_json(), "diff_id": diff_id, "created_by": created_by}
        for layer, diff_id, created_by in zip(facts.layers, facts.diff_ids(), facts.layer_history(), strict=True)
    ]


def _print_layers(facts: ImageFacts) -> None:
    width = len(str(len(facts.layers)))
    for i, (layer, created_by) in enumerate(zip(facts.layers, facts.layer_history(), strict=True), start=1):
        line = f"{i:>{width}}  {layer.digest}  {format_size(layer.size):>9}"
        if created_by:
            line += f"  {created_by}"
        print(line)


def _run(command: str, args: argparse.Namespace, show: Callable[[ImageFacts | bytes], None]) -> int:
    def err(line: str) -> None:
        print(line, file=sys.stderr)

    problem = check_proxy_socket_flags(args)
    if problem:
        err(f"image-proxy {command}: {problem}")
        return 2
    try:
        facts = run_interruptible(read_image, args)
    except (ProxyError, OSError) as e:
        report_error(command, e, args, err)
        return 1
    show(facts)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    def show(facts: ImageFacts | bytes) -> None:
        if isinstance(facts, bytes):
            sys.stdout.buffer.write(facts)
            sys.stdout.flush()
        elif args.json:
            print(json.dumps(_inspect_json(facts), indent=2))
        else:
            _print_inspect(facts)

    return _run("inspect", args, show)


def run_layers(args: argparse.Namespace) -> int:
    def show(facts: ImageFacts | bytes) -> None:
        assert isinstance(facts, ImageFacts)
        if args.json:
            print(json.dumps(_layers_json(facts), indent=2))
        else:
            _print_layers(facts)

    return _run("layers", args, show)


INSPECT_EPILOG = """\
examples:
  image-proxy inspect docker://quay.io/fedora/fedora-coreos:stable
  image-proxy inspect --raw docker://quay.io/fedora/fedora-coreos:stable     # the index, as stored
  image-proxy inspect --json --override-arch arm64 docker://registry.example/app:1.2
  image-proxy --policy examples/policy.json inspect oci:examples/hello:latest

global options (--policy, --override-arch, --debug, ...) may come before or after 'inspect': image-proxy --help
"""
LAYERS_EPILOG = """\
examples:
  image-proxy layers docker://quay.io/fedora/fedora-coreos:stable
  image-proxy layers --json oci:examples/hello:latest

global options (--policy, --override-arch, --debug, ...) may come before or after 'layers': image-proxy --help
"""


def add_inspect_parser(sub: argparse._SubParsersAction, add_global_flags: Callable[..., None]) -> None:
    p = sub.add_parser(
        "inspect",
        help="print an image's manifest digest, config and layers",
        description="Print what REF is: its manifest digest (and, for a multi-platform image, the index digest and "
        "the platforms it offers), the platform chosen for this host (or --override-*), the config (created, "
        "command, environment, labels) and the layers. Nothing is downloaded but the manifest and the config.",
        epilog=INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_flags(p, suppress=True)
    p.add_argument("reference", help="e.g. oci:examples/hello:latest or docker://registry.example/repo:tag")
    output = p.add_mutually_exclusive_group()
    output.add_argument(
        "--raw",
        action="store_true",
        help="print the manifest as stored: a multi-platform image's index or manifest list (as skopeo inspect --raw)",
    )
    output.add_argument(
        "--json", action="store_true", help="digests (instance and index), platforms, manifest, config, layers as JSON"
    )
    add_proxy_flags(p)
    p.set_defaults(run=run_inspect)


def add_layers_parser(sub: argparse._SubParsersAction, add_global_flags: Callable[..., None]) -> None:
    p = sub.add_parser(
        "layers",
        help="list an image's layers: digest, size, and the step that made each",
        description="List REF's layers in order: digest, size and the build step that made each (from the "
        "config's history); --json adds the media type and the diff ID.",
        epilog=LAYERS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_flags(p, suppress=True)
    p.add_argument("reference", help="e.g. oci:examples/hello:latest or docker://registry.example/repo:tag")
    p.add_argument("--json", action="store_true", help="digest, size, media type, diff ID, created-by as JSON")
    add_proxy_flags(p)
    p.set_defaults(run=run_layers)
