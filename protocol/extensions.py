"""The protocol extensions this server offers, as named by ``GetCapabilities`` (docs/PROTOCOL.md).

A client that never calls ``GetCapabilities`` sees plain protocol 0.2.8. Each name here is one
documented extension; a client must ignore names it does not know.
"""

from __future__ import annotations

#: extension names in the order they were added; the reply to GetCapabilities lists them all
SERVER_EXTENSIONS: tuple[str, ...] = (
    "request-ids",
    "blob-ranges",  # GetBlobAt (docs/PROTOCOL.md)
    "layer-toc",  # GetLayerTOC, GetLayerTarSplit (docs/PROTOCOL.md)
    "raw-manifest",  # GetRawManifest (docs/PROTOCOL.md)
    "status",  # GetStatus (docs/PROTOCOL.md)
    "session-settings",  # SetSessionSettings (docs/PROTOCOL.md)
)

__all__ = ["SERVER_EXTENSIONS"]
