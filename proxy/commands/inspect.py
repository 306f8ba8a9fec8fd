"""``image-proxy inspect REF`` and ``image-proxy layers REF``: what a client sees of an image, through the real
protocol.

Both are clients of the proxy (``protocol.client``): they start ``image-proxy experimental-image-proxy`` with the
registry flags given (or use the daemon at ``--proxy-socket``), so running them exercises the path an update agent
uses. The digest shown is the one GetManifest returns: for a multi-platform image, the instance chosen for this
host (or ``--override-*``); the manifest shown is the OCI manifest the proxy serves (Docker schema2 converted).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import attrs

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


@attrs.frozen
class ImageFacts:
    reference: str
    digest: str
    manifest: bytes
    config: dict[str, Any]
    config_blob: BlobDescriptor
    layers: tuple[BlobDescriptor, ...]

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
    """Manifest, config and layers of ``args.reference`` (the raw manifest bytes with ``--raw``)."""
    async with open_proxy(args) as proxy:
        image = await proxy.open_image(args.reference)
        digest, manifest = await proxy.get_manifest(image)
        if getattr(args, "raw", False):
            return manifest
        config_blob, layers = parse_manifest(args.reference, manifest)
        config = json.loads(await proxy.get_full_config(image))
        await proxy.close_image(image)
    return ImageFacts(args.reference, digest, manifest, config, config_blob, layers)


def _print_inspect(facts: ImageFacts) -> None:
    config = facts.config
    print(f"Image:       {facts.reference}")
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
    return {
        "reference": facts.reference,
        "digest": facts.digest,
        "ociManifestDigest": digest_of(facts.manifest),
        "platform": facts.platform,
        "manifest": json.loads(facts.manifest),
        "config": facts.config,
        "layers": [layer.as_json() for layer in facts.layers],
    }


def _layers_json(facts: ImageFacts) -> list[dict[str, Any]]:
    return [
        {**layer.as_json(), "diffID": diff_id, "createdBy": created_by}
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


def add_inspect_parser(sub: argparse._SubParsersAction, add_global_flags: Callable[..., None]) -> None:
    p = sub.add_parser("inspect", help="print an image's manifest digest, config and layers")
    add_global_flags(p, suppress=True)
    p.add_argument("reference", help="e.g. oci:examples/hello:latest or docker://registry.example/repo:tag")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--raw", action="store_true", help="print the OCI manifest as the proxy sends it")
    output.add_argument("--json", action="store_true", help="digest, manifest, config and layers as JSON")
    add_proxy_flags(p)
    p.set_defaults(run=run_inspect)


def add_layers_parser(sub: argparse._SubParsersAction, add_global_flags: Callable[..., None]) -> None:
    p = sub.add_parser("layers", help="list an image's layers: digest, size, and the step that made each")
    add_global_flags(p, suppress=True)
    p.add_argument("reference", help="e.g. oci:examples/hello:latest or docker://registry.example/repo:tag")
    p.add_argument("--json", action="store_true", help="digest, size, media type, diff ID, created-by as JSON")
    add_proxy_flags(p)
    p.set_defaults(run=run_layers)
