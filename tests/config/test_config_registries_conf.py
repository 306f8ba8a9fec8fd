"""registries.conf: files, merging, validation, prefix matching and pull sources (c/image sysregistriesv2)."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.config import (
    ConfigError,
    Endpoint,
    Mirror,
    PullSource,
    Registry,
    load_registries_conf,
    match_prefix,
    parse_registries_conf,
    registries_conf_paths,
)
from proxy.image.reference import parse_docker_reference
from tests.config.config_fakes import FakeHost

DIGEST = "sha256:" + "a" * 64


def conf(text: str):
    return parse_registries_conf(textwrap.dedent(text), "/test/registries.conf")


# ---------------------------------------------------------------------------------------------------------------------
# Which files


def test_missing_everything_is_an_empty_config(host: FakeHost) -> None:
    config = load_registries_conf(environ=host.environ, root=host.root)
    assert config.registries == ()
    assert config.credential_helpers == ("containers-auth.json",)
    assert config.short_name_mode == "permissive"
    assert config.sources == ()


def test_system_file_then_system_and_user_drop_ins(host: FakeHost) -> None:
    host.write(host.etc("containers/registries.conf"), 'unqualified-search-registries = ["a.io"]\n')
    host.write(host.etc("containers/registries.conf.d/10-b.conf"), 'unqualified-search-registries = ["b.io"]\n')
    host.write(host.etc("containers/registries.conf.d/05-a.conf"), 'credential-helpers = ["x"]\n')
    host.write(host.etc("containers/registries.conf.d/ignored.txt"), "not toml [")
    (host.etc("containers/registries.conf.d/sub.conf")).mkdir()
    user_dir = host.home / ".config/containers/registries.conf.d"
    host.write(user_dir / "00-user.conf", 'unqualified-search-registries = ["user.io"]\n')
    config = load_registries_conf(environ=host.environ, root=host.root)
    assert [p.name for p in config.sources] == ["registries.conf", "05-a.conf", "10-b.conf", "00-user.conf"]
    assert config.unqualified_search_registries == ("user.io",)  # user dir after system dir
    assert config.credential_helpers == ("x",)


def test_user_file_replaces_system_file_and_system_drop_ins(host: FakeHost) -> None:
    host.write(host.etc("containers/registries.conf"), 'unqualified-search-registries = ["system.io"]\n')
    host.write(host.etc("containers/registries.conf.d/a.conf"), 'short-name-mode = "enforcing"\n')
    user = host.write(host.home / ".config/containers/registries.conf", 'unqualified-search-registries = ["u.io"]\n')
    host.write(host.home / ".config/containers/registries.conf.d/b.conf", 'credential-helpers = ["h"]\n')
    config = load_registries_conf(environ=host.environ, root=host.root)
    assert config.sources == (user, host.home / ".config/containers/registries.conf.d/b.conf")
    assert config.unqualified_search_registries == ("u.io",)
    assert config.short_name_mode == "permissive"
    assert config.credential_helpers == ("h",)


def test_explicit_path_and_env_variable(host: FakeHost) -> None:
    explicit = host.write(host.base / "mine.conf", 'unqualified-search-registries = ["mine.io"]\n')
    host.write(host.home / ".config/containers/registries.conf", 'unqualified-search-registries = ["u.io"]\n')
    host.write(host.base / "registries.conf.d/x.conf", 'short-name-mode = "disabled"\n')  # not "beside" it
    host.write(host.etc("containers/registries.conf.d/y.conf"), 'credential-helpers = ["sys"]\n')
    config = load_registries_conf(explicit, environ=host.environ, root=host.root)
    assert config.unqualified_search_registries == ("mine.io",)
    assert config.short_name_mode == "permissive"
    assert config.credential_helpers == ("sys",)  # explicit file: system and user drop-in dirs still apply
    env = {**host.environ, "CONTAINERS_REGISTRIES_CONF": str(explicit)}
    assert load_registries_conf(environ=env, root=host.root).unqualified_search_registries == ("mine.io",)
    paths = registries_conf_paths(environ=env, root=host.root)
    assert paths.explicit and paths.main == explicit


def test_explicit_missing_file_is_an_error(host: FakeHost) -> None:
    missing = host.base / "nope.conf"
    with pytest.raises(ConfigError, match=r'loading registries configuration ".*nope.conf": file does not exist'):
        load_registries_conf(missing, environ=host.environ, root=host.root)


def test_invalid_toml_names_the_file(host: FakeHost) -> None:
    path = host.write(host.etc("containers/registries.conf"), "[[registry]\n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_registries_conf(environ=host.environ, root=host.root)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_drop_in_errors_name_the_drop_in(host: FakeHost) -> None:
    path = host.write(host.etc("containers/registries.conf.d/bad.conf"), "[[registry]]\nprefix = 1\n")
    with pytest.raises(ConfigError, match=r'loading drop-in registries configuration ".*bad.conf": registry.prefix'):
        load_registries_conf(environ=host.environ, root=host.root)
    path.write_text('[registries.search]\nregistries = ["a.io"]\n')
    with pytest.raises(ConfigError, match="registry must be in v2 format but is in v1"):
        load_registries_conf(environ=host.environ, root=host.root)


# ---------------------------------------------------------------------------------------------------------------------
# Merging


def test_drop_in_replaces_registry_with_same_prefix_and_keeps_others(host: FakeHost) -> None:
    host.write(
        host.etc("containers/registries.conf"),
        textwrap.dedent("""
            unqualified-search-registries = ["a.io"]
            credential-helpers = ["one"]
            [[registry]]
            location = "quay.io"
            [[registry.mirror]]
            location = "old-mirror.local"
            [[registry]]
            location = "other.io"
            insecure = true
        """),
    )
    host.write(
        host.etc("containers/registries.conf.d/50.conf"),
        textwrap.dedent("""
            credential-helpers = []
            [[registry]]
            prefix = "quay.io"
            location = "quay.io"
            blocked = true
        """),
    )
    config = load_registries_conf(environ=host.environ, root=host.root)
    quay = config.find_registry("quay.io/a/b")
    assert quay == Registry(prefix="quay.io", location="quay.io", blocked=True)
    assert config.find_registry("other.io/x") == Registry("other.io", "other.io", insecure=True)
    assert config.unqualified_search_registries == ("a.io",)  # not set in the drop-in: kept
    assert config.credential_helpers == ("containers-auth.json",)  # set to [] -> the default
    assert [r.prefix for r in config.registries] == sorted(r.prefix for r in config.registries)


def test_first_table_with_a_prefix_wins_within_a_file() -> None:
    config = conf("""
        [[registry]]
        location = "a.io"
        [[registry]]
        prefix = "a.io"
        location = "b.io"
    """)
    assert config.find_registry("a.io/x").location == "a.io"


# ---------------------------------------------------------------------------------------------------------------------
# Validation texts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[registry]]\nlocation = "https://a.io"\n', "invalid location 'https://a.io': URI schemes are not supported"),
        ("[[registry]]\ninsecure = true\n", "invalid condition: both location and prefix are unset"),
        (
            '[[registry]]\nprefix = "a.io/x"\n',
            "invalid condition: location is unset and prefix is not in the format: *.example.com",
        ),
        ('[[registry]]\nprefix = "*.a.io/x"\n', "Wildcarded prefix should be in the format: *.example.com"),
        ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\ninsecure = true\n', "mirror location is unset"),
        (
            '[[registry]]\nlocation = "a.io"\npull-from-mirror = "all"\n',
            "pull-from-mirror must not be set for a non-mirror registry 'a.io'",
        ),
        (
            '[[registry]]\nlocation = "a.io"\nmirror-by-digest-only = true\n'
            '[[registry.mirror]]\nlocation = "m.io"\npull-from-mirror = "all"\n',
            "cannot set mirror usage mirror-by-digest-only for the registry ('a.io') and pull-from-mirror",
        ),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "m.io"\npull-from-mirror = "some"\n',
            "unsupported pull-from-mirror value 'some' for mirror 'm.io'",
        ),
        (
            '[[registry]]\nprefix = "a.io/x"\nlocation = "a.io"\n[[registry]]\nlocation = "a.io"\ninsecure = true\n',
            "registry 'a.io' is defined multiple times with conflicting 'insecure' setting",
        ),
        (
            '[[registry]]\nlocation = "a.io"\nproxy = "ftp://p"\n',
            'proxy URL scheme "ftp" is not supported. Supported are http, https, socks5, socks5h',
        ),
        ('unqualified-search-registries = ["a.io/ns"]\n', "Invalid unqualified-search-registries entry 'a.io/ns'"),
        ('short-name-mode = "sometimes"\n', "invalid short-name mode: 'sometimes'"),
        ('unqualified-search-registries = "a.io"\n', "unqualified-search-registries must be an array of strings"),
        ('[[registry]]\nlocation = "a.io"\ninsecure = "yes"\n', "registry.insecure must be a boolean, not a string"),
        (
            '[registries.search]\nregistries = ["a.io"]\n[[registry]]\nlocation = "b.io"\n',
            "mixing sysregistry v1/v2 is not supported",
        ),
    ],
)
def test_invalid_configurations(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_registries_conf(text, "/test/registries.conf")
    assert message in str(info.value)
    assert '"/test/registries.conf"' in str(info.value)


def test_v1_is_converted() -> None:
    config = conf("""
        [registries.search]
        registries = ["search.io", "other.io"]
        [registries.insecure]
        registries = ["insecure.io", "both.io/"]
        [registries.block]
        registries = ["blocked.io", "both.io"]
    """)
    assert config.unqualified_search_registries == ("search.io", "other.io")
    assert config.find_registry("insecure.io/x") == Registry("insecure.io", "insecure.io", insecure=True)
    assert config.find_registry("blocked.io/x") == Registry("blocked.io", "blocked.io", blocked=True)
    assert config.find_registry("both.io/x") == Registry("both.io", "both.io", insecure=True, blocked=True)


def test_fields_and_defaults() -> None:
    config = conf("""
        unqualified-search-registries = ["registry.fedoraproject.org", "localhost:5000"]
        short-name-mode = "enforcing"
        credential-helpers = ["containers-auth.json", "secretservice"]
        [[registry]]
        prefix = "example.com/foo/"
        location = "internal.example.com/bar/"
        proxy = "socks5h://proxy:1080"
        [[registry.mirror]]
        location = "mirror-0.local/mirror-for-foo"
        [[registry.mirror]]
        location = "mirror-1.local/mirrors/foo"
        insecure = true
        pull-from-mirror = "tag-only"
    """)
    assert config.unqualified_search_registries == ("registry.fedoraproject.org", "localhost:5000")
    assert config.short_name_mode == "enforcing"
    assert config.credential_helpers == ("containers-auth.json", "secretservice")
    (registry,) = config.registries
    assert registry == Registry(
        prefix="example.com/foo",
        location="internal.example.com/bar",
        proxy="socks5h://proxy:1080",
        mirrors=(
            Mirror("mirror-0.local/mirror-for-foo"),
            Mirror("mirror-1.local/mirrors/foo", insecure=True, pull_from_mirror="tag-only"),
        ),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Prefix matching


@pytest.mark.parametrize(
    ("ref", "prefix", "expected"),
    [
        ("example.com", "example.com", 11),
        ("example.com/foo", "example.com", 11),
        ("example.com:5000/foo", "example.com", 11),  # c/image: "DON'T RELY ON" but it is so
        ("example.com@sha256:x", "example.com", 11),
        ("example.comm/foo", "example.com", -1),
        ("example.co", "example.com", -1),
        ("example.com/foobar", "example.com/foo", -1),
        ("example.com/foo/bar", "example.com/foo", 15),
        ("a.example.com/foo", "*.example.com", 13),
        ("a.b.example.com:5000/foo", "*.example.com", 15),
        ("example.com/foo", "*.example.com", -1),
        ("a.example.community/x", "*.example.com", -1),
        ("other.io/a.example.com", "*.example.com", -1),
    ],
)
def test_match_prefix(ref: str, prefix: str, expected: int) -> None:
    assert match_prefix(ref, prefix) == expected


_label = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
_host = st.lists(_label, min_size=1, max_size=3).map(".".join)
_path = st.lists(_label, min_size=0, max_size=3).map(lambda parts: "".join("/" + p for p in parts))


@given(host=_host, path=_path, extra=_path)
def test_a_name_matches_each_of_its_own_prefixes(host: str, path: str, extra: str) -> None:
    name = host + path + extra
    assert match_prefix(name, host + path) == len(host + path)
    assert match_prefix(name + ":tag", host + path) == len(host + path)


@given(host=_host, path=_path, junk=_label)
def test_a_prefix_never_matches_in_the_middle_of_a_component(host: str, path: str, junk: str) -> None:
    assert match_prefix(host + path + junk, host + path) == -1


@given(sub=_host, domain=_host, path=_path)
def test_wildcard_matches_subdomains_only(sub: str, domain: str, path: str) -> None:
    # c/image looks at the first occurrence of ".domain" only (strings.Index); see the quirk test below.
    assume(f"{sub}.{domain}".find(f".{domain}") == len(sub))
    assert match_prefix(f"{sub}.{domain}{path}", f"*.{domain}") == len(f"{sub}.{domain}")
    assert match_prefix(f"{domain}{path}", f"*.{domain}") == -1


def test_wildcard_looks_at_the_first_occurrence_only() -> None:
    assert match_prefix("a.io.io/x", "*.io") == -1  # ".io" first found at 1, followed by "." -> no match
    assert match_prefix("a.b.io/x", "*.io") == 6


def test_find_registry_longest_prefix_wins() -> None:
    config = conf("""
        [[registry]]
        location = "example.com"
        [[registry]]
        prefix = "example.com/ns"
        location = "ns.example.com"
        [[registry]]
        prefix = "example.com/ns/repo"
        location = "repo.example.com"
        [[registry]]
        prefix = "*.example.com"
    """)
    assert config.find_registry("example.com/x").location == "example.com"
    assert config.find_registry("example.com/ns/x").location == "ns.example.com"
    assert config.find_registry("example.com/ns/repo").location == "repo.example.com"
    assert config.find_registry("example.com/ns/repository").location == "ns.example.com"
    assert config.find_registry("a.example.com/ns/repo").prefix == "*.example.com"
    assert config.find_registry("other.io/x") is None


def test_wildcard_wins_a_tie_by_sort_order() -> None:
    config = conf("""
        [[registry]]
        location = "a.example.com"
        insecure = true
        [[registry]]
        prefix = "*.example.com"
    """)
    # Both prefixes are 13 characters; c/image keeps registries sorted and takes the first strictly longest.
    assert config.find_registry("a.example.com/x").prefix == "*.example.com"


# ---------------------------------------------------------------------------------------------------------------------
# Pull sources

MANPAGE_EXAMPLE = """
    [[registry]]
    prefix = "example.com/foo"
    location = "internal-registry-for-example.com/bar"
    [[registry.mirror]]
    location = "example-mirror-0.local/mirror-for-foo"
    [[registry.mirror]]
    location = "example-mirror-1.local/mirrors/foo"
    insecure = true
    [[registry]]
    location = "registry.com"
    [[registry.mirror]]
    location = "mirror.registry.com"
"""


def test_pull_sources_manpage_example() -> None:
    config = conf(MANPAGE_EXAMPLE)
    sources = config.pull_sources(parse_docker_reference("example.com/foo/image:latest"))
    assert [str(s.reference) for s in sources] == [
        "example-mirror-0.local/mirror-for-foo/image:latest",
        "example-mirror-1.local/mirrors/foo/image:latest",
        "internal-registry-for-example.com/bar/image:latest",
    ]
    assert [s.is_mirror for s in sources] == [True, True, False]
    assert [s.endpoint.insecure for s in sources] == [False, True, False]
    sources = config.pull_sources(parse_docker_reference("registry.com/image:latest"))
    assert [str(s.reference) for s in sources] == ["mirror.registry.com/image:latest", "registry.com/image:latest"]


def test_pull_sources_without_configuration() -> None:
    ref = parse_docker_reference("quay.io/a/b@" + DIGEST)
    assert conf("").pull_sources(ref) == [PullSource(Endpoint(str(ref)), ref, is_mirror=False)]


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        (":1", ["all.local", "tag.local", "docker.io"]),
        ("@" + DIGEST, ["all.local", "digest.local", "docker.io"]),
    ],
)
def test_pull_from_mirror_rules(suffix: str, expected: list[str]) -> None:
    config = conf("""
        [[registry]]
        prefix = "docker.io"
        location = "docker.io"
        [[registry.mirror]]
        location = "all.local"
        [[registry.mirror]]
        location = "digest.local"
        pull-from-mirror = "digest-only"
        [[registry.mirror]]
        location = "tag.local"
        pull-from-mirror = "tag-only"
    """)
    sources = config.pull_sources(parse_docker_reference("busybox" + suffix))
    assert [s.reference.domain for s in sources] == expected
    assert all(s.reference.path == "library/busybox" for s in sources)


def test_mirror_by_digest_only() -> None:
    config = conf("""
        [[registry]]
        location = "quay.io"
        mirror-by-digest-only = true
        [[registry.mirror]]
        location = "m.local/quay"
    """)
    tagged = config.pull_sources(parse_docker_reference("quay.io/a/b:1"))
    assert [str(s.reference) for s in tagged] == ["quay.io/a/b:1"]
    digested = config.pull_sources(parse_docker_reference("quay.io/a/b@" + DIGEST))
    assert [str(s.reference) for s in digested] == ["m.local/quay/a/b@" + DIGEST, "quay.io/a/b@" + DIGEST]


def test_wildcard_with_no_location_keeps_the_reference() -> None:
    config = conf("""
        [[registry]]
        prefix = "*.example.com"
        insecure = true
        [[registry.mirror]]
        location = "mirror.local/all"
    """)
    ref = parse_docker_reference("a.example.com/ns/img:1")
    sources = config.pull_sources(ref)
    assert [str(s.reference) for s in sources] == ["mirror.local/all/ns/img:1", "a.example.com/ns/img:1"]
    assert sources[-1].endpoint == Endpoint("", insecure=True)


def test_rewrite_must_give_a_canonical_reference() -> None:
    config = conf("""
        [[registry]]
        prefix = "example.com/foo"
        location = "docker.io"
    """)
    with pytest.raises(ConfigError, match="repository name must be canonical"):
        config.pull_sources(parse_docker_reference("example.com/foo/img:1"))


def test_blocked_registry_is_an_error_naming_it() -> None:
    config = conf("""
        [[registry]]
        location = "evil.io"
        blocked = true
    """)
    with pytest.raises(ConfigError, match=r"registry evil.io is blocked in registries.conf \(/test/registries.conf\)"):
        config.pull_sources(parse_docker_reference("evil.io/x:1"))
    with pytest.raises(ConfigError, match=r"registry evil\.io is blocked"):
        config.check_not_blocked("evil.io/x")
    config.check_not_blocked("good.io/x")


def test_blocked_source_with_mirrors_uses_only_the_mirrors() -> None:
    # c/image decides "blocked" per endpoint: OpenShift's NeverContactSource relies on this.
    config = conf("""
        [[registry]]
        location = "source.io"
        blocked = true
        [[registry.mirror]]
        location = "mirror.local/source"
        [[registry]]
        location = "blocked-mirror.local"
        blocked = true
    """)
    sources = config.pull_sources(parse_docker_reference("source.io/x:1"))
    assert [str(s.reference) for s in sources] == ["mirror.local/source/x:1"]


def test_blocked_mirror_is_left_out() -> None:
    config = conf("""
        [[registry]]
        location = "source.io"
        [[registry.mirror]]
        location = "bad-mirror.local"
        [[registry.mirror]]
        location = "good-mirror.local"
        [[registry]]
        location = "bad-mirror.local"
        blocked = true
    """)
    sources = config.pull_sources(parse_docker_reference("source.io/x:1"))
    assert [s.reference.domain for s in sources] == ["good-mirror.local", "source.io"]
