"""How deeply a document read from outside may nest: one limit, checked before parsing.

``json.loads`` recurses once per nesting level (and so do PyYAML's composer, ``tomllib`` and our own walks of
the decoded values, ``proxy.image.gojson`` among them): a manifest 600 levels deep used to end in a ``RecursionError``
and an "internal error" reply. Every JSON document the proxy reads from outside (manifests, indexes, configs,
TOCs, policy files, auth files) is checked here first, on the raw text, and refused with a
:class:`NestingError` whose text says what was wrong (``JSON nested too deeply (over 64 levels)``); the caller
adds what the document is (``manifest sha256:…``, the file's path).

The limit, :data:`MAX_DEPTH` = 64 levels of arrays and objects: the real formats need far fewer (an OCI
manifest or index 4, an image config 4, a zstd:chunked or eStargz TOC 4, policy.json 6, auth.json 3,
registries.d 3), none has a field that lets a producer nest freely except annotations-like maps of strings,
and 64 keeps the deepest recursion of our parsers and walks a few hundred frames, far below Python's
recursion limit whatever the caller's stack. Go's ``encoding/json`` allows 10000 levels, so a document
between 65 and 10000 levels deep that skopeo would read is refused here: no such document is a real
manifest, config or configuration file. The same limit applies to YAML (registries.d) and TOML
(registries.conf), whose formats nest no deeper than JSON's.

The JSON check is cheap (a third of what ``json.loads`` costs on a large TOC, nothing on a document with no more
opening brackets than the limit): escapes are cut out, then everything but quotes and brackets, then what lies
between quotes; the depth is the running sum of +1/-1 over the brackets left.
"""

from __future__ import annotations

import array
import itertools
import json
import re
import tomllib
from collections.abc import Callable
from typing import Any

#: the deepest nesting of arrays and objects (or YAML collections, TOML arrays and tables) accepted
MAX_DEPTH = 64

__all__ = [
    "MAX_DEPTH",
    "NestingError",
    "check_json_depth",
    "check_yaml_depth",
    "json_depth",
    "loads",
    "toml_loads",
    "value_depth",
]


class NestingError(ValueError):
    """A document nests deeper than the limit. ``str(e)``: ``JSON nested too deeply (over 64 levels)``."""

    def __init__(self, limit: int, kind: str = "JSON") -> None:
        super().__init__(f"{kind} nested too deeply (over {limit} levels)")
        self.limit = limit
        self.kind = kind


# Escapes are pairs (a backslash and the character after it): removed first, so that no quote they hold is
# taken for the end of a string. Then everything but quotes and brackets goes; between quotes are the brackets
# of strings, which do not count.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_BRACKET_OR_QUOTE = bytes(b for b in range(256) if b not in b'[]{}"')
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def _openers(text: str | bytes) -> int:
    if isinstance(text, str):
        return text.count("[") + text.count("{")
    return text.count(b"[") + text.count(b"{")


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (0 for a scalar), brackets in strings ignored.

    ``bytes`` must be UTF-8 (or any ASCII-compatible encoding: only ASCII bytes are looked at). The text need
    not be valid JSON: an unterminated string, say, gives some depth, and the parser then says what is wrong.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"\\" in data:
        data = _ESCAPE.sub(b"", data)
    # Two adjacent quotes are an empty string, or the end of one string and the start of the next: dropping
    # them changes nothing, and leaves few quotes to split at.
    data = data.translate(None, _NOT_BRACKET_OR_QUOTE).replace(b'""', b"")
    brackets = b"".join(data.split(b'"')[::2]) if b'"' in data else data
    if not brackets:
        return 0
    return max(0, max(itertools.accumulate(array.array("b", brackets.translate(_SIGNS)))))


def check_json_depth(text: str | bytes, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`NestingError` if ``text`` nests deeper than ``limit`` (see :func:`json_depth`)."""
    if _openers(text) <= limit:
        return
    if json_depth(text) > limit:
        raise NestingError(limit)


def loads(data: str | bytes, limit: int = MAX_DEPTH, **kwargs: Any) -> Any:
    """``json.loads`` of a document from outside, refused with :class:`NestingError` when it nests deeper than
    ``limit``. Other errors are ``json.loads``'s (``ValueError``, ``UnicodeDecodeError`` is one)."""
    if isinstance(data, bytes | bytearray) and not json.detect_encoding(data).startswith("utf-8"):
        # json.loads reads UTF-16 and UTF-32 too (told by the first bytes): check the text it will parse
        data = bytes(data).decode(json.detect_encoding(data), "surrogatepass")
    check_json_depth(data, limit)
    try:
        return json.loads(data, **kwargs)
    except RecursionError:
        # not expected below the limit; kept so that no RecursionError ever leaves a parse
        raise NestingError(limit) from None


def check_yaml_depth(data: str | bytes, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`NestingError` if the YAML collections of ``data`` nest deeper than ``limit``.

    Reads the event stream (PyYAML's parser keeps its own stack; only its composer recurses), so it runs before
    ``yaml.safe_load`` and costs one more parse; aliases are not followed. Syntax errors are ``yaml.YAMLError``.
    """
    depth = 0
    import yaml  # about 8 ms at start-up otherwise: only registries.d files are YAML

    for event in yaml.parse(data, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > limit:
                raise NestingError(limit, "YAML")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def toml_loads(text: str, limit: int = MAX_DEPTH) -> dict[str, Any]:
    """``tomllib.loads``, refused with :class:`NestingError` when arrays and tables nest deeper than ``limit``.

    ``tomllib`` recurses into inline arrays and tables (a ``RecursionError`` becomes a NestingError), while
    dotted keys and table headers nest without recursing: the decoded document is measured afterwards, without
    recursion. Syntax errors are ``tomllib.TOMLDecodeError``.
    """
    try:
        document = tomllib.loads(text)
    except RecursionError:
        raise NestingError(limit, "TOML") from None
    if value_depth(document, limit) > limit:
        raise NestingError(limit, "TOML")
    return document


def value_depth(value: Any, stop_above: int | None = None) -> int:
    """The nesting depth of decoded lists and dicts, walked without recursion (0 for a scalar); the walk ends
    as soon as the depth exceeds ``stop_above``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    children: Callable[[Any], Any]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = dict.values
        elif isinstance(item, list):
            children = iter
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if stop_above is not None and deepest > stop_above:
                return deepest
        stack.extend((child, depth) for child in children(item))
    return deepest
