"""``image-proxy inspect REF``: what a client sees of an image, through the real protocol.

It spawns ``image-proxy experimental-image-proxy`` and talks to it with the client bindings,
so running it exercises the same path an update agent uses.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from protocol.client import ImageProxy
from protocol.errors import ProxyError


def _forwarded_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in ("override_arch", "override_os", "override_variant", "tmpdir"):
        value = getattr(args, name, None)
        if value:
            flags += [f"--{name.replace('_', '-')}", value]
    if args.debug:
        flags.append("--debug")
    return flags


async def _inspect(args: argparse.Namespace) -> int:
    async with ImageProxy.spawn(extra_args=_forwarded_flags(args)) as proxy:
        image = await proxy.open_image(args.reference)
        digest, manifest = await proxy.get_manifest(image)
        if args.raw:
            sys.stdout.buffer.write(manifest)
            sys.stdout.flush()
            return 0
        config = json.loads(await proxy.get_full_config(image))
        layers = await proxy.get_layer_info(image) or []
        await proxy.close_image(image)
    platform = "/".join(filter(None, (config.get("os"), config.get("architecture"), config.get("variant"))))
    print(f"Image:      {args.reference}")
    print(f"Digest:     {digest}")
    print(f"Platform:   {platform}")
    if config.get("created"):
        print(f"Created:    {config['created']}")
    runtime = config.get("config") or {}
    for key in ("Entrypoint", "Cmd", "Env", "WorkingDir"):
        if runtime.get(key):
            print(f"{key + ':':<12}{json.dumps(runtime[key])}")
    print(f"Layers:     {len(layers)}")
    for layer in layers:
        print(f"  {layer['digest']}  {layer['size']:>12}  {layer['media_type']}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    try:
        return trio.run(_inspect, args)
    except ProxyError as e:
        print(f"image-proxy inspect: {e}", file=sys.stderr)
        return 1
