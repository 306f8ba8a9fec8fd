"""The ``host`` fixture: a fake HOME, XDG_RUNTIME_DIR, root (for /etc and /run) and PATH for each test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # make ``tests.config`` importable however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.config.config_fakes import FakeHost, make_host  # noqa: E402


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return make_host(tmp_path)
