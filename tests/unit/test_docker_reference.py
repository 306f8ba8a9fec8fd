import pytest

from proxy.image.reference import DockerReference, normalize_docker_reference, parse_docker_reference


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox:1", "docker.io/library/busybox:1"),
        ("index.docker.io/user/app", "docker.io/user/app:latest"),
        ("quay.io/fedora/fedora:42", "quay.io/fedora/fedora:42"),
        ("localhost/app", "localhost/app:latest"),
        ("127.0.0.1:5000/a/b/c:v1", "127.0.0.1:5000/a/b/c:v1"),
        ("x/y@sha256:" + "a" * 64, "docker.io/x/y@sha256:" + "a" * 64),
        ("[::1]:5000/app:t", "[::1]:5000/app:t"),
    ],
)
def test_normalization(text, expected):
    assert normalize_docker_reference(text) == expected


def test_parts():
    ref = parse_docker_reference("127.0.0.1:5000/ns/app:v1@sha256:" + "b" * 64)
    assert ref == DockerReference("127.0.0.1:5000", "ns/app", "v1", "sha256:" + "b" * 64)
    assert ref.name == "127.0.0.1:5000/ns/app"
    assert parse_docker_reference("app").with_default_tag().tag == "latest"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("docker.io/App", "must be lowercase"),
        ("a" * 64, "64-byte hexadecimal"),
        ("app:bad tag", "invalid reference format"),
        ("quay.io/" + "a" * 300, "invalid reference format"),
        ("", "invalid reference format"),
    ],
)
def test_invalid(text, message):
    with pytest.raises(ValueError, match=message):
        parse_docker_reference(text)
