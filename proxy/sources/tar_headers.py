"""Tar headers, pure: ustar, PAX and GNU forms read from 512-byte blocks, and the rules a member's name and link
target must follow before an archive transport uses them (relative, no ``..``, UTF-8, no NUL, bounded). Every
refusal is an ``ArchiveError`` naming the archive and the member."""

from __future__ import annotations

import re

from proxy.image.gojson import go_quote

BLOCK = 512
#: bytes of one member name or symlink target
MAX_NAME_BYTES = 4096
#: bytes of one PAX extended header (local or global)
MAX_EXTENDED_HEADER = 1 << 20


class ArchiveError(Exception):
    """An archive refused or unreadable; the text names the archive, and the member or the cap concerned."""


TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"6": "a FIFO",
    b"S": "a GNU sparse file",
    b"V": "a GNU volume header",
    b"M": "a GNU multi-volume continuation",
    b"D": "a GNU dump directory",
}
REGULAR = (b"0", b"\0", b"7")
_OCTAL = re.compile(rb"[0-7]+")


def show(raw: bytes) -> str:
    return go_quote(raw.decode("utf-8", "replace"))


def shown(member: bytes | str) -> str:
    """A member for an error: its raw name quoted, or a description as it is."""
    return member if isinstance(member, str) else show(member)


def number(field: bytes) -> int | None:
    """A numeric header field: octal text, or GNU base-256 (non-negative only); None when invalid."""
    if field and field[0] & 0x80:
        if field[0] & 0x40:
            return None  # negative
        return int.from_bytes(bytes([field[0] & 0x3F]) + field[1:], "big")
    text = field.strip(b" \0")
    if not text:
        return 0
    if not _OCTAL.fullmatch(text):
        return None
    return int(text, 8)


def checksum_ok(block: bytes) -> bool:
    stored = number(block[148:156])
    if stored is None:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    high = sum(1 for b in block if b >= 0x80) - sum(1 for b in block[148:156] if b >= 0x80)
    return stored == unsigned - 256 * high  # some old tars sum signed chars


def c_string(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def header_name(block: bytes) -> bytes:
    name = c_string(block[0:100])
    if block[257:263] == b"ustar\0":  # POSIX ustar (GNU's magic is "ustar  \0" and has no prefix)
        prefix = c_string(block[345:476] if block[508:512] == b"tar\0" else block[345:500])  # star: shorter
        if prefix:
            name = prefix + b"/" + name
    return name


def pax_records(data: bytes, where: str, at: int) -> dict[str, bytes]:
    """``LEN KEY=VALUE\\n`` records; later records win, an empty value unsets."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break  # NUL padding
        space = data.find(b" ", pos, pos + 20)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        record = data[pos : pos + length]
        if length <= space - pos + 1 or len(record) < length or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError(f"archive {go_quote(where)}: malformed PAX extended header at offset {at}")
        key, _, value = record[space - pos + 1 : -1].partition(b"=")
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise ArchiveError(f"archive {go_quote(where)}: malformed PAX extended header at offset {at}") from None
        if value:
            records[name] = value
        else:
            records.pop(name, None)
        pos += length
    return records


def clean_name(text: str) -> str | None:
    """A slash-separated path as the index keys it (``.`` and empty components dropped); None when it is
    absolute or has a ``..`` component (no member has such a name)."""
    if text.startswith("/"):
        return None
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def member_name(raw: bytes, where: str) -> tuple[str, bool]:
    """The cleaned name of a member, and whether it was written as a directory (trailing slash)."""

    def refuse(why: str) -> ArchiveError:
        return ArchiveError(f"archive {go_quote(where)}: member {show(raw)}: {why}; refused")

    if len(raw) > MAX_NAME_BYTES:
        raise refuse(f"name longer than {MAX_NAME_BYTES} bytes (MAX_NAME_BYTES)")
    if b"\0" in raw:
        raise refuse("name contains a NUL byte")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("name is not valid UTF-8") from None
    if text.startswith("/"):
        raise refuse("absolute name")
    name = clean_name(text)
    if name is None:
        raise refuse('name has a ".." component')
    return name, text.endswith("/")


def link_target(name: str, raw: bytes, shown: str, where: str) -> str:
    """A docker-archive symlink's target as an index name: relative, staying inside the archive."""

    def refuse(why: str) -> ArchiveError:
        return ArchiveError(f"archive {go_quote(where)}: member {shown}: symbolic link to {show(raw)} {why}; refused")

    if not raw or len(raw) > MAX_NAME_BYTES or b"\0" in raw:
        raise refuse("with an empty, overlong or NUL-holding target")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("that is not valid UTF-8") from None
    if text.startswith("/"):
        raise refuse("with an absolute target")
    stack = name.split("/")[:-1]
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise refuse("that leads out of the archive")
            stack.pop()
        else:
            stack.append(part)
    if not stack:
        raise refuse("that leads to the archive's root")
    return "/".join(stack)
