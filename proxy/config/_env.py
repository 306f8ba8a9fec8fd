"""Environment helpers shared by the configuration readers (no globals: the caller passes ``environ``)."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path


def home_dir(environ: Mapping[str, str]) -> Path:
    """``$HOME``, else the password database entry of the current user (what ``homedir.Get()`` does)."""
    home = environ.get("HOME", "")
    if home:
        return Path(home)
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        return Path("/")


def under_root(root: Path, absolute: str) -> Path:
    """``absolute`` (``/etc/...``) re-rooted under ``root`` (``RootForImplicitAbsolutePaths``)."""
    return root / absolute.lstrip("/")
