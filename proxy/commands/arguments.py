"""Argument types for the command line, written once: the commands and the entry points (``proxy.cli``) parse the
same kinds of values the same way, with errors argparse shows as ``invalid …``."""

from __future__ import annotations

import argparse
import grp
import pwd
from collections.abc import Callable


def boolean(text: str) -> bool:
    """Go's strconv.ParseBool spellings that skopeo accepts: 1/t/true/yes, 0/f/false/no."""
    lowered = text.lower()
    if lowered in ("1", "t", "true", "yes"):
        return True
    if lowered in ("0", "f", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


def seconds(*, zero_allowed: bool = False, what: str = "a timeout") -> Callable[[str], float]:
    """A number of seconds: positive (or 0 too, with ``zero_allowed``), finite."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
        low_ok = value >= 0 if zero_allowed else value > 0
        if not (low_ok and value < float("inf")):
            bound = "0 or more" if zero_allowed else "a positive number of"
            raise argparse.ArgumentTypeError(f"{what} must be {bound} seconds, not {text!r}")
        return value

    return parse


def whole_number(low: int = 0, high: int | None = None, what: str = "a count") -> Callable[[str], int]:
    """A whole number from ``low`` to ``high`` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{what} must be {bound}, not {text!r}")
        return value

    return parse


def byte_size(text: str) -> int:
    """``20G``, ``512M``, a number of bytes."""
    from proxy.config.daemon_conf import parse_byte_size  # the settings file's reader: imported when a size is given

    try:
        return parse_byte_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _lookup(text: str, by_name: Callable[[str], int], kind: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return by_name(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no {kind} named {text!r} on this system") from None


def user(text: str) -> int:
    """A user name or uid."""
    return _lookup(text, lambda name: pwd.getpwnam(name).pw_uid, "user")


def group(text: str) -> int:
    """A group name or gid."""
    return _lookup(text, lambda name: grp.getgrnam(name).gr_gid, "group")


def octal_mode(text: str) -> int:
    """A file mode in octal (``0660``)."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid octal mode {text!r} (e.g. 0660)") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid socket mode {text!r}")
    return value


__all__ = ["boolean", "byte_size", "group", "octal_mode", "seconds", "user", "whole_number"]
