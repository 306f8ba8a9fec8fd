"""The methods of protocol 0.2.8 and the validation of their arguments.

Each method has a table entry saying which arguments it takes, how many file descriptors its
reply carries and whether it is answered at all. ``parse_args`` turns a decoded request into
typed arguments or raises ``ProtocolViolation`` with a text that names what is wrong.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from protocol.codec import MAX_SAFE_INTEGER, json_type_name, shown
from protocol.digests import parse_digest
from protocol.errors import ProtocolViolation
from protocol.messages import Request
from protocol.session_settings import parse_session_settings

MAX_REFERENCE_LENGTH = 4096
#: GetBlobAt: the most ranges in one call, and the longest range (docs/PROTOCOL.md)
MAX_RANGES_PER_CALL = 1024
MAX_RANGE_LENGTH = 1 << 30


class Param(enum.Enum):
    """Kinds of arguments."""

    IMAGE_ID = "imgid"
    PIPE_ID = "pipeid"
    DIGEST = "digest"
    SIZE = "size"
    IMAGE_REF = "imgref"
    RANGES = "ranges"
    SETTINGS = "settings"


@attrs.frozen
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    since: str
    fd_count: int = 0
    replies: bool = True
    needs_init: bool = True
    strict_arity: bool = True


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("Initialize", (), "0.2.1", needs_init=False),
        MethodSpec("OpenImage", (Param.IMAGE_REF,), "0.2.1"),
        MethodSpec("OpenImageOptional", (Param.IMAGE_REF,), "0.2.4"),
        MethodSpec("CloseImage", (Param.IMAGE_ID,), "0.2.1"),
        MethodSpec("GetManifest", (Param.IMAGE_ID,), "0.2.1", fd_count=1),
        MethodSpec("GetConfig", (Param.IMAGE_ID,), "0.2.2", fd_count=1),
        MethodSpec("GetFullConfig", (Param.IMAGE_ID,), "0.2.3", fd_count=1),
        MethodSpec("GetBlob", (Param.IMAGE_ID, Param.DIGEST, Param.SIZE), "0.2.1", fd_count=1),
        MethodSpec("GetRawBlob", (Param.IMAGE_ID, Param.DIGEST), "0.2.8", fd_count=2),
        MethodSpec("GetLayerInfo", (Param.IMAGE_ID,), "0.2.5"),
        MethodSpec("GetLayerInfoPiped", (Param.IMAGE_ID,), "0.2.7", fd_count=1),
        MethodSpec("FinishPipe", (Param.PIPE_ID,), "0.2.1", needs_init=False),
        MethodSpec("Shutdown", (), "0.2.1", replies=False, needs_init=False, strict_arity=False),
        # extensions (docs/PROTOCOL.md); "ext" marks methods skopeo's proxy does not have
        MethodSpec("GetCapabilities", (), "ext", needs_init=False),
        MethodSpec("GetBlobAt", (Param.IMAGE_ID, Param.DIGEST, Param.RANGES), "ext", fd_count=1),
        MethodSpec("GetLayerTOC", (Param.IMAGE_ID, Param.DIGEST), "ext", fd_count=1),
        MethodSpec("GetLayerTarSplit", (Param.IMAGE_ID, Param.DIGEST), "ext", fd_count=1),
        MethodSpec("GetRawManifest", (Param.IMAGE_REF,), "ext", fd_count=1),
        MethodSpec("GetStatus", (), "ext", fd_count=1, needs_init=False),
        MethodSpec("SetSessionSettings", (Param.SETTINGS,), "ext", needs_init=False),
    )
}


def parse_uint(value: Any, what: str) -> int:
    """An unsigned integer sent as a JSON number, at most 2^53-1 (as the Go server requires)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolViolation(f"expecting numeric, not {json_type_name(value)}")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
            raise ProtocolViolation(f"{what}: expecting an integer, not {value!r}")
        value = int(value)
    if value < 0:
        raise ProtocolViolation(f"{what}: expecting a non-negative integer, not {value}")
    if value > MAX_SAFE_INTEGER:
        raise ProtocolViolation(f"out of range integer for numeric {value}")
    return value


def parse_image_ref(value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolViolation(f"expecting string imageref, not {json_type_name(value)}")
    if not value:
        raise ProtocolViolation("invalid image reference: empty string")
    if len(value) > MAX_REFERENCE_LENGTH:
        raise ProtocolViolation(f"invalid image reference: longer than {MAX_REFERENCE_LENGTH} characters")
    if "\x00" in value:
        raise ProtocolViolation("invalid image reference: contains a NUL character")
    return value


def parse_ranges(value: Any) -> list[tuple[int, int]]:
    """GetBlobAt's ``[[offset, length], ...]``: 1 to MAX_RANGES_PER_CALL pairs, each length 1 to
    MAX_RANGE_LENGTH, every end within 2^53-1."""
    if not isinstance(value, list):
        raise ProtocolViolation(f"expecting an array of [offset, length] ranges, not {json_type_name(value)}")
    if not value:
        raise ProtocolViolation("expecting at least one [offset, length] range")
    if len(value) > MAX_RANGES_PER_CALL:
        raise ProtocolViolation(f"{len(value)} ranges in one call; at most {MAX_RANGES_PER_CALL} are allowed")
    ranges = []
    for index, item in enumerate(value):
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolViolation(f"range {index}: expecting [offset, length], not {shown(item, 100)}")
        offset = parse_uint(item[0], f"range {index} offset")
        length = parse_uint(item[1], f"range {index} length")
        if not 1 <= length <= MAX_RANGE_LENGTH:
            raise ProtocolViolation(f"range {index}: length {length} is not within 1..{MAX_RANGE_LENGTH}")
        if offset + length > MAX_SAFE_INTEGER:
            raise ProtocolViolation(f"range {index}: ends beyond {MAX_SAFE_INTEGER}")
        ranges.append((offset, length))
    return ranges


def _parse_one(param: Param, value: Any) -> Any:
    if param is Param.IMAGE_ID:
        return parse_uint(value, "imgid")
    if param is Param.PIPE_ID:
        return parse_uint(value, "pipeid")
    if param is Param.SIZE:
        return parse_uint(value, "size")
    if param is Param.DIGEST:
        return parse_digest(value)
    if param is Param.IMAGE_REF:
        return parse_image_ref(value)
    if param is Param.RANGES:
        return parse_ranges(value)
    if param is Param.SETTINGS:
        return parse_session_settings(value)
    raise AssertionError(param)  # pragma: no cover


def _arity_error(spec: MethodSpec, found: int) -> ProtocolViolation:
    """The Go server's texts, with the expected parameters named."""
    names = ", ".join(p.value for p in spec.params)
    if not spec.params:
        return ProtocolViolation("invalid request, expecting zero arguments")
    if len(spec.params) == 1:
        return ProtocolViolation(f"invalid request, expecting one argument ({names}), found {found}")
    return ProtocolViolation(f"found {found} args, expecting ({names})")


def parse_args(request: Request) -> tuple[MethodSpec, list[Any]]:
    """Look up the method and validate its arguments.

    Raises ProtocolViolation naming an unknown method, a wrong argument count or a bad value.
    """
    spec = METHODS.get(request.method)
    if spec is None:
        # Go's text, the name unquoted (the reply's encoder escapes what JSON must); a long one is cut
        name = request.method if len(request.method) <= 100 else request.method[:100] + "..."
        raise ProtocolViolation(f"unknown method: {name}")
    if not spec.strict_arity:
        return spec, []
    if len(request.args) != len(spec.params):
        raise _arity_error(spec, len(request.args))
    return spec, [_parse_one(p, v) for p, v in zip(spec.params, request.args, strict=True)]
