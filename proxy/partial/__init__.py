"""Partial blob access: byte ranges of a blob (GetBlobAt) and the tables of contents of zstd:chunked and
eStargz layers (GetLayerTOC, GetLayerTarSplit). See docs/PROTOCOL.md.

- ``planner``: which bytes to ask for, and how (sans-I/O): merged spans, multi-range batches, what a host
  is known to support.
- ``multipart``: a ``multipart/byteranges`` body parser (sans-I/O), parts matched by their Content-Range.
- ``toc``: where a layer's TOC is (annotations, footers) and how to decode and verify it (sans-I/O).
- ``fetch``: the registry I/O: single ranges in parallel, multi-range probed lazily, each range resumable.
- ``local``: ranges of a blob on disk (blob cache, oci:, dir:, archives), no network.
- ``service``: what the handler calls.
"""
