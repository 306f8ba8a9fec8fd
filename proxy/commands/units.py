"""Sizes for people (parsing them is ``arguments.byte_size``)."""

from __future__ import annotations

_DECIMAL = (1000, ("B", "kB", "MB", "GB", "TB"))
_BINARY = (1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def format_size(n: int, *, binary: bool = True) -> str:
    """``n`` bytes in binary units (MiB = 2^20 bytes), as skopeo's and podman's progress, ``du -h`` and disk quotas
    show them; with ``binary=False`` in decimal units (MB = 10^6 bytes)."""
    base, units = _BINARY if binary else _DECIMAL
    value = float(n)
    for unit in units:
        if value < base or unit == units[-1]:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= base
    raise AssertionError  # pragma: no cover


__all__ = ["format_size"]
