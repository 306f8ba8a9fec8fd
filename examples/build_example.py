#!/usr/bin/env python3
"""Regenerate ``examples/hello``: a tiny OCI layout (tag ``latest``) used by the README and smoke tests.

The output is byte-for-byte reproducible on any machine: the layers are stored-deflate gzip (no zlib
dependence), tar entries and config dates are fixed, and the JSON is written in a fixed order. The
builder is the one the tests use (tests/support/images.py).

    python examples/build_example.py [OUTPUT_DIR]      # default: examples/hello
    skopeo inspect oci:examples/hello:latest
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.images import BuiltImage, ImageSpec, LayerSpec, build_oci_layout  # noqa: E402

HELLO = ImageSpec(
    layers=(
        LayerSpec({"hello.txt": b"Hello from image-proxy!\n"}, "COPY hello.txt /"),
        LayerSpec({"etc/motd": b"This image only holds text files; there is nothing to run.\n"}, "COPY motd /etc/"),
    ),
    env=("PATH=/usr/bin:/bin",),
    cmd=("/bin/cat", "/hello.txt"),
    labels={"org.opencontainers.image.title": "hello", "org.opencontainers.image.description": "image-proxy example"},
    gzip_level=0,
)


def build(output: Path) -> BuiltImage:
    """Replace ``output`` (only if it is absent or an OCI layout) with the example layout."""
    if output.exists():
        if not (output / "oci-layout").is_file():
            raise SystemExit(f"{output} exists and is not an OCI layout; refusing to replace it")
        shutil.rmtree(output)
    image = build_oci_layout(output, {"latest": HELLO}).images["latest"]
    assert isinstance(image, BuiltImage)
    return image


def main(argv: list[str]) -> int:
    output = Path(argv[1]) if len(argv) > 1 else ROOT / "examples" / "hello"
    image = build(output)
    print(f"{image.ref}\n  manifest {image.manifest_digest} ({image.manifest_size} bytes)")
    print(f"  config   {image.config_digest} ({image.config_size} bytes)")
    for layer in image.layers:
        print(f"  layer    {layer.digest} ({layer.size} bytes): {', '.join(layer.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
