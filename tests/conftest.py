"""Session fixtures: the test images (built once), the skopeo executable and both servers' command lines."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # make ``tests.support`` importable however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.support.images import (  # noqa: E402
    AMD64,
    SKOPEO_HINT,
    BuiltImage,
    BuiltIndex,
    StandardImages,
    standard_layout,
    with_transport_copies,
)


@pytest.fixture(scope="session")
def skopeo() -> str:
    """The skopeo executable; missing skopeo is a failure, never a skip."""
    path = shutil.which("skopeo")
    if path is None:
        pytest.fail(SKOPEO_HINT, pytrace=False)
    return path


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> StandardImages:
    """The standard images in one OCI layout (stdlib only, no skopeo needed)."""
    return standard_layout(tmp_path_factory.mktemp("images") / "layout")


@pytest.fixture(scope="session")
def layouts(built: StandardImages, skopeo: str, tmp_path_factory: pytest.TempPathFactory) -> StandardImages:
    """Everything from tests/support/images.py, including skopeo-made dir:/oci-archive:/docker-archive: copies."""
    return with_transport_copies(built, tmp_path_factory.mktemp("copies"))


@pytest.fixture(scope="session")
def single(built: StandardImages) -> BuiltImage:
    return built.single


@pytest.fixture(scope="session")
def multi(built: StandardImages) -> BuiltIndex:
    return built.multi


@pytest.fixture(scope="session")
def v2s2(built: StandardImages) -> BuiltImage:
    return built.v2s2


@pytest.fixture(scope="session")
def v2list(built: StandardImages) -> BuiltIndex:
    return built.v2list


@pytest.fixture(scope="session")
def big(built: StandardImages) -> BuiltImage:
    return built.big


@pytest.fixture(scope="session")
def nolayers(built: StandardImages) -> BuiltImage:
    return built.nolayers


@pytest.fixture(scope="session")
def our_proxy_argv() -> list[str]:
    return [sys.executable, "-m", "proxy", "experimental-image-proxy"]


@pytest.fixture(scope="session")
def skopeo_proxy_argv(skopeo: str) -> list[str]:
    return [skopeo, "experimental-image-proxy"]


@pytest.fixture(scope="session")
def our_proxy_argv_amd64(our_proxy_argv: list[str]) -> list[str]:
    return [*our_proxy_argv, *AMD64]


@pytest.fixture(scope="session")
def skopeo_proxy_argv_amd64(skopeo_proxy_argv: list[str]) -> list[str]:
    return [*skopeo_proxy_argv, *AMD64]


def with_flags(argv: Sequence[str], *flags: str) -> list[str]:
    """``argv`` plus flags (both servers accept skopeo's global flags after the subcommand)."""
    return [*argv, *flags]


@pytest.fixture(scope="session")
def registry_images(built: StandardImages, skopeo: str, tmp_path_factory: pytest.TempPathFactory):
    """A plain-HTTP docker-registry on 127.0.0.1 holding the standard images (pushed with skopeo copy)."""
    from tests.support.registry import push_standard_images, registry_process

    with registry_process(tmp_path_factory.mktemp("registry")) as registry:
        yield push_standard_images(registry, built)
