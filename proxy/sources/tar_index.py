"""Tar archives read in place, never unpacked: an index of the members a transport needs (``oci-archive:``,
``docker-archive:``), made by parsing the tar headers here.

Why. Extracting with tarfile rests on its ``filter="data"``, which CVE-2025-4517 bypasses before Python
3.11.13/3.12.11/3.13.4 (a symlink chain longer than ``realpath`` follows, then a file written through it): an
archive wrote outside the temporary directory, as the daemon's user, before the signature policy was consulted.
Reading members at their offsets needs no filter at all: no name from an archive ever reaches the file system,
so no symlink, ``..``, device or duplicate in one can make anything be written anywhere, on any Python version.

How.

- The archive is opened as the client (``localfs.open_regular_file``: never a FIFO or device, never blocks).
- The 512-byte headers (v7, ustar, star, GNU, PAX) are parsed here rather than by tarfile, which keeps a
  ``TarInfo`` per member (122 MiB for 200 000 members). Only the members the transport may read are recorded,
  as ``name -> (offset, size)`` of their data (and, in a docker-archive, a symlink as ``name -> target``), so
  an archive of 100 000 other members leaves an empty index. ``docker-archive`` learns which members it needs
  from ``manifest.json`` and indexes again for them (a scan of headers only).
- A compressed archive (gzip, bzip2, xz, zstd, by magic number) is decompressed once, in a worker thread, into
  a private temporary file under ``--tmpdir`` / ``$TMPDIR``: ``O_TMPFILE`` (else ``mkstemp`` and an immediate
  unlink), mode 0600, so it has no name while it exists and vanishes with its last fd. An ``oci-archive``'s
  copy holds only the data of the members an OCI layout reads; a ``docker-archive``'s the whole tar (it is
  indexed again). Decompression stops at the tar's end-of-archive block.
- Members are served from their offsets with ``pread`` (``FileBlob``), each blob with its own ``dup`` of the
  file's fd, so closing a blob never closes the archive and closing the archive never breaks a blob.

Rules (each refusal is a ``ArchiveError`` naming the archive and the member):

- Only regular files and directories (directories are ignored). Hard links, devices, FIFOs, GNU sparse files,
  volume headers and every other type are refused, wherever they are in the archive. Symbolic links are
  refused in an ``oci-archive``; a ``docker-archive`` may hold them (every archive skopeo's ``docker-archive``
  writer makes has ``<id>/layer.tar`` symlinks, ``docker save`` links repeated layers), as aliases inside the
  index only: the target must be relative and stay inside the archive, and one is followed at most once for a
  member manifest.json names (c/image's ``openTarComponent``), never through a directory.
- Names: valid UTF-8, no NUL, not absolute, no ``..`` component, at most ``MAX_NAME_BYTES`` bytes. ``.`` and
  empty components are dropped (``./index.json`` is ``index.json``).
- A name the transport reads that appears twice (after that cleaning) is refused: readers disagree on which
  copy wins (c/image the first, tar the last), and refusing is simplest and safe. Duplicates of members never
  read cannot be ambiguous and are not tracked (that would cost memory per member).
- PAX extended headers (``path``, ``linkpath``, ``size``; ``GNU.sparse.*`` refused) and GNU long names are
  honoured, bounded, at most ``MAX_EXTENDED_HEADERS`` before one member.

Caps (module constants):

- ``MAX_MEMBERS`` = 100 000 members (PAX global headers included): more than any image needs (a 127-layer
  docker-archive has ~500), and it bounds the time an index takes (headers are ~2 µs of checksum each).
- ``MAX_DECOMPRESSED_SIZE`` = 64 GiB of decompressed tar, and never more than half the free space of the
  temporary directory's file system when decompression starts: real archives of the largest images (tens of
  GiB) fit, one OpenImage cannot fill the disk others need, and a bomb stops there (a member whose declared size
  would pass the cap is refused at its header, before any of its data is decompressed). The same cap bounds a
  docker-archive's compressed layer, decompressed (not stored) to learn its size.
- JSON members (index.json, manifests, manifest.json, configs): 16 MiB each, read into memory only up to that.
- ``MAX_NAME_BYTES`` = 4096 (PATH_MAX) per name and link target; ``MAX_EXTENDED_HEADER`` = 1 MiB per PAX header
  (Go's archive/tar uses the same bound), GNU long names at most ``MAX_NAME_BYTES`` + 1.

Cancellation. Indexing and decompression run in a worker thread (``run_cancellable``) that checks a
``CancelFlag`` for every header and every MiB decompressed; a cancelled trio caller sets the flag and abandons
the thread, which stops within milliseconds and releases what it holds (the temporary file, the archive's fd),
also when it finished just as its caller gave up.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from proxy.common.threads import CancelFlag, WorkAbandoned, run_cancellable
from proxy.image.gojson import go_quote
from proxy.sources.compression import DECOMPRESSION_ERRORS, decompressing_reader, detect_compression
from proxy.sources.localfs import Identity, open_regular_file, resolved_path
from proxy.sources.oci_layout import FileBlob, FileSection, LayoutFiles, os_error_text
from proxy.sources.tar_headers import (
    BLOCK,
    MAX_EXTENDED_HEADER,
    MAX_NAME_BYTES,
    REGULAR,
    TYPE_NAMES,
    ArchiveError,
    c_string,
    checksum_ok,
    clean_name,
    header_name,
    link_target,
    member_name,
    number,
    pax_records,
    show,
    shown,
)

T = TypeVar("T")

#: members (entries) per archive
MAX_MEMBERS = 100_000
#: bytes of decompressed tar (also: at most half the free space under the temporary directory)
MAX_DECOMPRESSED_SIZE = 64 << 30
#: extended headers (PAX, GNU long name / long link) before one member
MAX_EXTENDED_HEADERS = 4

_ZERO_BLOCK = bytes(BLOCK)
_CHUNK = 1 << 20
_READ_AHEAD = 64 << 10


def decompressed_cap(directory: str) -> tuple[int, str]:
    """The cap on an archive's decompressed size under ``directory``, and how it was chosen (for errors)."""
    cap = MAX_DECOMPRESSED_SIZE
    why = f"the cap on an archive's decompressed size, MAX_DECOMPRESSED_SIZE = {cap} bytes"
    try:
        st = os.statvfs(directory)
    except OSError:
        return cap, why
    half = st.f_bavail * st.f_frsize // 2
    if half < cap:
        return half, f"the cap on an archive's decompressed size: half of the {half * 2} bytes free under {directory}"
    return cap, why


def _private_temp(directory: str) -> int:
    """A read-write fd of a new file under ``directory`` that has no name (mode 0600)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise  # (those three: this file system or kernel has no O_TMPFILE)
    fd, name = tempfile.mkstemp(prefix="image-proxy-archive-", dir=directory)
    try:
        os.unlink(name)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ------------------------------------------------------------------------------------------ reading the stream


class _FileCursor:
    """The tar is a file (an uncompressed archive, or a decompressed copy): headers by pread, data skipped."""

    def __init__(self, fd: int, size: int, where: str) -> None:
        self.fd = fd
        self.size = size
        self.where = where
        self.pos = 0
        self._buf = b""
        self._buf_at = 0

    def read(self, n: int) -> bytes:
        """``n`` bytes from the current position (fewer at the end of the file)."""
        start = self.pos - self._buf_at
        if start < 0 or start + n > len(self._buf):
            self._buf = os.pread(self.fd, max(n, _READ_AHEAD), self.pos)
            self._buf_at = self.pos
            start = 0
        data = self._buf[start : start + n]
        self.pos += len(data)
        return data

    def check_room(self, n: int, member: bytes | str) -> None:
        """Refuse (naming ``member``: raw name, or a description) ``n`` bytes more than the file holds."""
        if self.pos + n > self.size:
            raise ArchiveError(
                f"archive {go_quote(self.where)}: member {shown(member)} is truncated: it needs {n} bytes from offset "
                f"{self.pos}, the archive has {self.size}"
            )

    def skip(self, n: int, keep: bool) -> int:
        """Pass ``n`` bytes (checked with ``check_room``); the offset of the first one in this file."""
        start = self.pos
        self.pos += n
        return start


class _StreamCursor:
    """The tar is a decompressed stream, copied into a private file as it is read: everything
    (``copy_all``, for a file indexed again later) or only the data of members kept."""

    def __init__(
        self, reader: Any, out_fd: int, cap: int, why: str, where: str, flag: CancelFlag, copy_all: bool
    ) -> None:
        self._reader = reader
        self._out = out_fd
        self.cap = cap
        self.why = why
        self.where = where
        self._flag = flag
        self._copy_all = copy_all
        self.pos = 0  # in the decompressed stream
        self.written = 0  # size of the private file

    def _pull(self, n: int) -> bytes:
        parts = []
        got = 0
        while got < n:
            try:
                data = self._reader.read(min(n - got, _CHUNK))
            except DECOMPRESSION_ERRORS as e:
                raise ArchiveError(f"archive {go_quote(self.where)}: decompressing: {e}") from None
            if not data:
                break
            parts.append(data)
            got += len(data)
            self.pos += len(data)
            self._flag.check()
        return b"".join(parts)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._out, view)
            except OSError as e:
                raise ArchiveError(
                    f"archive {go_quote(self.where)}: writing its decompressed copy: {os_error_text(e)}"
                ) from None
            view = view[n:]
            self.written += n

    def _over(self, n: int, member: bytes | str | None) -> ArchiveError:
        what = f"member {shown(member)} ({n} bytes)" if member is not None else f"{n} more bytes"
        return ArchiveError(
            f"archive {go_quote(self.where)}: {what} at offset {self.pos} of the decompressed archive would take it "
            f"past {self.cap} bytes ({self.why})"
        )

    def read(self, n: int) -> bytes:
        if self.pos + n > self.cap:
            raise self._over(n, None)
        data = self._pull(n)
        if self._copy_all:
            self._write(data)
        return data

    def check_room(self, n: int, member: bytes | str) -> None:
        if self.pos + n > self.cap:
            raise self._over(n, member)

    def skip(self, n: int, keep: bool) -> int:
        start = self.written
        write = keep or self._copy_all
        remaining = n
        while remaining:
            data = self._pull(min(remaining, _CHUNK))
            if not data:
                raise ArchiveError(
                    f"archive {go_quote(self.where)}: truncated: the decompressed archive ends at {self.pos} bytes, "
                    f"inside a member's data"
                )
            if write:
                self._write(data)
            remaining -= len(data)
        return start


Cursor = _FileCursor | _StreamCursor


def scan(
    cursor: Cursor,
    where: str,
    want: Callable[[str], bool],
    links_allowed: bool,
    flag: CancelFlag,
    files: dict[str, tuple[int, int]],
    links: dict[str, str],
) -> None:
    """Walk every header to the end of the archive, refusing what the rules refuse; record the wanted regular
    members in ``files`` (data offset in the cursor's file, size) and, if allowed, wanted symlinks in ``links``."""
    members = 0
    quoted = go_quote(where)
    pending: dict[str, bytes] = {}
    extended = 0
    while True:
        flag.check()
        at = cursor.pos
        block = cursor.read(BLOCK)
        if len(block) < BLOCK or block == _ZERO_BLOCK:
            if block and len(block) < BLOCK:
                raise ArchiveError(f"archive {quoted}: truncated: a header at offset {at} is cut short")
            if pending:
                raise ArchiveError(f"archive {quoted}: an extended header at the end names no member")
            return  # an end-of-archive block, or the end of the file at a header boundary (as Go's reader)
        if not checksum_ok(block):
            raise ArchiveError(f"archive {quoted}: invalid tar header at offset {at} (bad checksum)")
        typeflag = block[156:157]
        size = number(block[124:136])
        if size is None:
            raise ArchiveError(f"archive {quoted}: invalid size field in the tar header at offset {at}")
        padded = -size % BLOCK

        if typeflag in (b"x", b"g", b"L", b"K"):
            bound = MAX_EXTENDED_HEADER if typeflag in (b"x", b"g") else MAX_NAME_BYTES + 1
            if size > bound:
                raise ArchiveError(
                    f"archive {quoted}: extended header at offset {at} of {size} bytes is larger than {bound} bytes "
                    f"({'MAX_EXTENDED_HEADER' if bound == MAX_EXTENDED_HEADER else 'MAX_NAME_BYTES + 1'}); refused"
                )
            cursor.check_room(size + padded, f"(extended header at offset {at})")
            data = cursor.read(size)
            cursor.skip(padded, False)
            if typeflag == b"g":
                members += 1  # global headers apply to nothing we read; they count as members
                if members > MAX_MEMBERS:
                    raise ArchiveError(f"archive {quoted}: more than {MAX_MEMBERS} members (MAX_MEMBERS); refused")
                continue
            extended += 1
            if extended > MAX_EXTENDED_HEADERS:
                raise ArchiveError(
                    f"archive {quoted}: more than {MAX_EXTENDED_HEADERS} extended headers before one member "
                    f"(at offset {at}); refused"
                )
            if typeflag == b"x":
                records = pax_records(data, where, at)
                if any(k.startswith("GNU.sparse.") for k in records):
                    pending["sparse"] = b"1"  # refused at the member, by its name
                for key in ("path", "linkpath", "size"):
                    if key in records:
                        pending[key] = records[key]
            else:
                pending["path" if typeflag == b"L" else "linkpath"] = data.rstrip(b"\0")
            continue

        members += 1
        if members > MAX_MEMBERS:
            raise ArchiveError(f"archive {quoted}: more than {MAX_MEMBERS} members (MAX_MEMBERS); refused")
        raw_name = pending.get("path", header_name(block))
        raw_link = pending.get("linkpath", c_string(block[157:257]))
        if "size" in pending:
            if not pending["size"].isdigit():
                raise ArchiveError(f"archive {quoted}: invalid PAX size for member {show(raw_name)}")
            size = int(pending["size"])
            padded = -size % BLOCK
        sparse = "sparse" in pending
        pending = {}
        extended = 0
        name, dir_syntax = member_name(raw_name, where)
        if sparse:
            typeflag = b"S"

        if typeflag == b"5" or (typeflag in (b"0", b"\0") and dir_syntax):
            cursor.check_room(size + padded, raw_name)
            cursor.skip(size + padded, False)
            continue
        if typeflag in REGULAR:
            if not name:
                raise ArchiveError(
                    f"archive {quoted}: member {show(raw_name)}: a file named as the archive's root; refused"
                )
            wanted = want(name)
            if wanted and (name in files or name in links):
                raise ArchiveError(f"archive {quoted}: member {show(raw_name)}: the name appears twice; refused")
            cursor.check_room(size + padded, raw_name)
            offset = cursor.skip(size, wanted)
            cursor.skip(padded, False)
            if wanted:
                files[name] = (offset, size)
            continue
        if typeflag == b"2" and links_allowed:
            target = link_target(name, raw_link, show(raw_name), where)
            if want(name):
                if name in files or name in links:
                    raise ArchiveError(f"archive {quoted}: member {show(raw_name)}: the name appears twice; refused")
                links[name] = target
            cursor.check_room(size + padded, raw_name)
            cursor.skip(size + padded, False)
            continue
        kind = TYPE_NAMES.get(typeflag, f"of tar type {typeflag!r}")
        if typeflag in (b"1", b"2"):
            kind = f"{kind} to {show(raw_link)}"
        raise ArchiveError(
            f"archive {quoted}: member {show(raw_name)} is {kind}; only regular files and directories are accepted"
        )


# ------------------------------------------------------------------------------------------ the index


class TarIndex(LayoutFiles):
    """The members of a tar file a transport may read, served from their offsets. Owns ``fd`` (the archive, or
    its private decompressed copy). Usable as an OCI layout's files (``LayoutFiles``). Synchronous: worker
    threads."""

    def __init__(self, where: str, real_path: str, fd: int, size: int, rescannable: bool) -> None:
        self.where = where
        self.real_path = real_path
        self._fd: int | None = fd
        self.size = size
        self.rescannable = rescannable
        self.files: dict[str, tuple[int, int]] = {}
        self.links: dict[str, str] = {}

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.where}: archive closed")
        return self._fd

    def index(self, want: Callable[[str], bool], links_allowed: bool, flag: CancelFlag) -> None:
        """Scan the (uncompressed) file again, recording more wanted members."""
        assert self.rescannable
        files: dict[str, tuple[int, int]] = {}
        links: dict[str, str] = {}
        scan(_FileCursor(self.fileno(), self.size, self.where), self.where, want, links_allowed, flag, files, links)
        self.files.update(files)
        self.links.update(links)

    def _missing(self, relative: str) -> FileNotFoundError:
        return FileNotFoundError(errno.ENOENT, "no such file or directory", f"{self.where}/{relative}")

    def member(self, relative: str) -> tuple[int, int]:
        """(offset, size) of the regular member ``relative``; FileNotFoundError when not indexed."""
        name = clean_name(relative)
        found = self.files.get(name) if name is not None else None
        if found is None:
            raise self._missing(relative)
        return found

    def open_member(self, member: tuple[int, int]) -> FileBlob:
        fd = os.dup(self.fileno())
        return FileBlob(fd, member[0], member[1])

    def read_member(self, member: tuple[int, int], relative: str, limit: int) -> bytes:
        size = member[1]
        if size > limit:
            raise OSError(errno.EFBIG, f"file larger than {limit} bytes", f"{self.where}/{relative}")
        blob = self.open_member(member)
        try:
            parts = []
            while chunk := blob.read_sync(_CHUNK):
                parts.append(chunk)
        finally:
            blob.close_sync()
        data = b"".join(parts)
        if len(data) != size:
            raise OSError(errno.EIO, f"archive member cut short ({len(data)} of {size} bytes)", self.where)
        return data

    # LayoutFiles
    def read(self, relative: str, limit: int) -> bytes:
        return self.read_member(self.member(relative), relative, limit)

    def open_blob(self, relative: str) -> FileBlob:
        return self.open_member(self.member(relative))

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def open_tar(
    path: str,
    identity: Identity | None,
    tmpdir: str | None,
    want: Callable[[str], bool],
    links_allowed: bool,
    rescannable: bool,
    flag: CancelFlag,
) -> TarIndex:
    """Open the archive ``path`` as ``identity`` and index the members ``want`` accepts (a compressed archive is
    first decompressed into a private file under ``tmpdir``: all of it when ``rescannable``, else only the data of
    those members). Synchronous, in a worker thread. OSError when it cannot be opened (naming it); ArchiveError
    when it is refused or unreadable."""
    fd, st = open_regular_file(path, identity)
    try:
        real = resolved_path(fd, path)
        compression = detect_compression(os.pread(fd, 8, 0))
        if compression is None:
            index = TarIndex(path, real, fd, st.st_size, rescannable=True)
            fd = -1  # the index's now
            try:
                scan(
                    _FileCursor(index.fileno(), index.size, path),
                    path,
                    want,
                    links_allowed,
                    flag,
                    index.files,
                    index.links,
                )
            except BaseException:
                index.close()
                raise
            return index
        return _decompressed(path, real, fd, st.st_size, compression, tmpdir, want, links_allowed, rescannable, flag)
    except OSError as e:
        raise ArchiveError(f"archive {go_quote(path)}: {os_error_text(e)}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _decompressed(
    path: str,
    real: str,
    fd: int,
    size: int,
    compression: str,
    tmpdir: str | None,
    want: Callable[[str], bool],
    links_allowed: bool,
    rescannable: bool,
    flag: CancelFlag,
) -> TarIndex:
    """Index the compressed archive open as ``fd`` (not taken) while copying it into a private file."""
    directory = tmpdir or tempfile.gettempdir()
    cap, why = decompressed_cap(directory)
    try:
        out = _private_temp(directory)
    except OSError as e:
        raise ArchiveError(
            f"archive {go_quote(path)}: creating a temporary file under {directory}: {os_error_text(e)}"
        ) from None
    index = TarIndex(path, real, out, 0, rescannable=rescannable)
    try:
        with contextlib.ExitStack() as stack:
            compressed = FileBlob(os.dup(fd), 0, size)
            stack.callback(compressed.close_sync)
            raw = io.BufferedReader(FileSection(compressed), _CHUNK)
            stack.callback(raw.close)
            reader = decompressing_reader(raw, compression)
            stack.callback(reader.close)
            cursor = _StreamCursor(reader, out, cap, why, path, flag, copy_all=rescannable)
            scan(cursor, path, want, links_allowed, flag, index.files, index.links)
            index.size = cursor.written
    except BaseException:
        index.close()
        raise
    return index


__all__ = [
    "DECOMPRESSION_ERRORS",
    "MAX_DECOMPRESSED_SIZE",
    "MAX_EXTENDED_HEADER",
    "MAX_EXTENDED_HEADERS",
    "MAX_MEMBERS",
    "MAX_NAME_BYTES",
    "ArchiveError",
    "CancelFlag",
    "TarIndex",
    "WorkAbandoned",
    "clean_name",
    "decompressed_cap",
    "decompressing_reader",
    "detect_compression",
    "open_tar",
    "run_cancellable",
    "scan",
]
