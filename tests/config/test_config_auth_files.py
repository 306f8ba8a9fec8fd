"""Credentials: skopeo's flags, the containers-auth.json(5) search order, key matching, helpers (c/image config.go)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import (
    AuthFile,
    ConfigError,
    Credentials,
    CredentialSource,
    RegistryToken,
    auth_file_paths,
    run_credential_helper,
)
from proxy.config.auth_files import auth_key_lookup_order, normalize_auth_file_key
from tests.config.config_fakes import FakeHost, auth


def source(host: FakeHost, **options) -> CredentialSource:
    return CredentialSource.from_options(environ=host.environ, root=host.root, **options)


def auths(*pairs: tuple[str, str, str]) -> dict:
    return {"auths": {key: {"auth": auth(user, password)} for key, user, password in pairs}}


# ---------------------------------------------------------------------------------------------------------------------
# Secrets stay secret


def test_reprs_never_show_secrets() -> None:
    creds = Credentials("alice", "hunter2", identity_token="refresh-xyz")
    token = RegistryToken("bearer-abc")
    for text in (repr(creds), str(creds), repr(token), str(token), repr([creds, token])):
        assert "hunter2" not in text and "refresh-xyz" not in text and "bearer-abc" not in text
    assert "alice" in repr(creds)
    assert repr(Credentials("u", "p")).endswith("identity_token=None)")


# ---------------------------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"creds": "a:b", "no_creds": True}, "creds and no-creds cannot be specified at the same time"),
        ({"username": "a", "password": "b", "no_creds": True}, "username and no-creds cannot be specified"),
        ({"creds": "a:b", "username": "a", "password": "b"}, "creds and username cannot be specified at the same time"),
        ({"username": "a"}, "password must be specified when username is specified"),
        ({"password": "b"}, "username must be specified when password is specified"),
        ({"creds": ""}, "credentials can't be empty"),
        ({"creds": ":pw"}, "username can't be empty"),
    ],
)
def test_flag_errors(host: FakeHost, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        source(host, **options)


def test_creds_flag_splits_at_the_first_colon(host: FakeHost) -> None:
    assert source(host, creds="u:p:q").lookup("quay.io", "a/b") == Credentials("u", "p:q")
    assert source(host, creds="u").lookup("quay.io", "a/b") == Credentials("u", "")
    assert source(host, username="u", password="p").lookup("quay.io") == Credentials("u", "p")


def test_flags_win_over_files_for_the_named_host_only(host: FakeHost) -> None:
    host.write_json(host.runtime / "containers/auth.json", auths(("mirror.local", "mu", "mp"), ("quay.io", "f", "f")))
    creds = source(host, creds="u:p")
    assert creds.lookup("quay.io", "a/b", logical_host="quay.io") == Credentials("u", "p")
    # a mirror on another host gets its own credentials from the files, never the flag's
    assert creds.lookup("mirror.local", "a/b", logical_host="quay.io") == Credentials("mu", "mp")
    assert creds.lookup("nothing.local", "a/b", logical_host="quay.io") is None


def test_no_creds_is_anonymous_even_with_files(host: FakeHost) -> None:
    host.write_json(host.runtime / "containers/auth.json", auths(("quay.io", "f", "f"), ("mirror.local", "m", "m")))
    anonymous = source(host, no_creds=True)
    assert anonymous.lookup("quay.io", "a/b") is None
    # as c/image: --no-creds is cleared for a mirror on another host, which then uses the files
    assert anonymous.lookup("mirror.local", "a/b", logical_host="quay.io") == Credentials("m", "m")


def test_registry_token(host: FakeHost) -> None:
    tokens = source(host, registry_token="tok", creds="u:p")
    assert tokens.lookup("quay.io", "a/b") == RegistryToken("tok")
    assert tokens.lookup("mirror.local", "a/b", logical_host="quay.io") is None


# ---------------------------------------------------------------------------------------------------------------------
# Which files


def test_default_paths_in_order(host: FakeHost) -> None:
    paths = auth_file_paths(environ=host.environ, root=host.root)
    assert paths == [
        AuthFile(host.runtime / "containers/auth.json"),
        AuthFile(host.home / ".config/containers/auth.json"),
        AuthFile(host.home / ".docker/config.json"),
        AuthFile(host.home / ".dockercfg", legacy=True),
    ]


def test_paths_follow_xdg_config_home_docker_config_and_missing_runtime_dir(host: FakeHost) -> None:
    env = {"HOME": str(host.home), "XDG_CONFIG_HOME": str(host.base / "cfg"), "DOCKER_CONFIG": str(host.base / "dk")}
    paths = [f.path for f in auth_file_paths(environ=env, root=host.root)]
    assert paths[0] == host.root / f"run/containers/{__import__('os').getuid()}/auth.json"
    assert paths[1:3] == [host.base / "cfg/containers/auth.json", host.base / "dk/config.json"]


def test_xdg_runtime_dir_that_does_not_exist_is_skipped_with_a_warning(
    host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    env = {**host.environ, "XDG_RUNTIME_DIR": str(host.base / "gone")}
    with caplog.at_level(logging.WARNING):
        paths = auth_file_paths(environ=env, root=host.root)
    assert paths[0].path == host.home / ".config/containers/auth.json"
    assert "does not exist" in caplog.text


def test_authfile_flag_and_env_use_only_that_file(host: FakeHost) -> None:
    own = host.write_json(host.base / "own.json", auths(("quay.io", "own", "pw")))
    host.write_json(host.runtime / "containers/auth.json", auths(("quay.io", "x", "x"), ("other.io", "o", "o")))
    assert source(host, authfile=str(own)).lookup("quay.io") == Credentials("own", "pw")
    assert source(host, authfile=str(own)).lookup("other.io") is None
    env = {**host.environ, "REGISTRY_AUTH_FILE": str(own)}
    from_env = CredentialSource.from_options(environ=env, root=host.root)
    assert [f.path for f in from_env.auth_files] == [own]
    assert source(host, authfile=str(host.base / "missing.json")).lookup("quay.io") is None


def test_earlier_file_wins_and_later_files_fill_in(host: FakeHost) -> None:
    host.write_json(host.runtime / "containers/auth.json", auths(("quay.io", "runtime", "1")))
    host.write_json(host.home / ".config/containers/auth.json", auths(("quay.io", "config", "2"), ("b.io", "c", "2")))
    host.write_json(host.home / ".docker/config.json", auths(("c.io", "docker", "3")))
    host.write_json(host.home / ".dockercfg", {"https://d.io/v1/": {"auth": auth("legacy", "4"), "email": "x"}})
    creds = source(host)
    assert creds.lookup("quay.io", "a/b") == Credentials("runtime", "1")
    assert creds.lookup("b.io", "a/b") == Credentials("c", "2")
    assert creds.lookup("c.io", "a/b") == Credentials("docker", "3")
    assert creds.lookup("d.io", "a/b") == Credentials("legacy", "4")
    assert creds.lookup("e.io", "a/b") is None


def test_docker_config_env(host: FakeHost) -> None:
    host.write_json(host.base / "dk/config.json", auths(("quay.io", "dk", "1")))
    host.write_json(host.home / ".docker/config.json", auths(("quay.io", "home", "2")))
    env = {**host.environ, "DOCKER_CONFIG": str(host.base / "dk")}
    assert CredentialSource.from_options(environ=env, root=host.root).lookup("quay.io") == Credentials("dk", "1")


# ---------------------------------------------------------------------------------------------------------------------
# Keys


def test_most_specific_key_wins(host: FakeHost) -> None:
    host.write_json(
        host.runtime / "containers/auth.json",
        auths(("quay.io", "host", "1"), ("quay.io/ns", "ns", "2"), ("quay.io/ns/repo", "repo", "3")),
    )
    creds = source(host)
    assert creds.lookup("quay.io", "ns/repo") == Credentials("repo", "3")
    assert creds.lookup("quay.io", "ns/other") == Credentials("ns", "2")
    assert creds.lookup("quay.io", "ns/repo/sub") == Credentials("repo", "3")
    assert creds.lookup("quay.io", "nsx/repo") == Credentials("host", "1")
    assert creds.lookup("quay.io.evil", "ns/repo") is None


def test_url_keys_and_docker_hub_normalisation(host: FakeHost) -> None:
    host.write_json(
        host.home / ".docker/config.json",
        auths(
            ("https://index.docker.io/v1/", "hub", "1"), ("https://quay.io", "q", "2"), ("http://h.io/v2/", "h", "3")
        ),
    )
    creds = source(host)
    assert creds.lookup("docker.io", "library/busybox") == Credentials("hub", "1")
    assert creds.lookup("registry-1.docker.io", "library/busybox") == Credentials("hub", "1")
    assert creds.lookup("quay.io", "a/b") == Credentials("q", "2")
    assert creds.lookup("h.io", "a/b") == Credentials("h", "3")
    assert creds.lookup("index.docker.io.evil", "a") is None


def test_namespaced_keys_do_not_leak_to_the_host(host: FakeHost) -> None:
    host.write_json(host.runtime / "containers/auth.json", auths(("quay.io/ns", "ns", "1")))
    assert source(host).lookup("quay.io", "other/repo") is None


def test_identity_token_and_entries_without_a_colon(host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    host.write_json(
        host.runtime / "containers/auth.json",
        {
            "auths": {
                "a.io": {"auth": auth("u", "p\x00\x00"), "identitytoken": "refresh"},
                "b.io": {"auth": "bm9jb2xvbg=="},  # "nocolon"
                "c.io": {},  # what Docker writes when a helper holds the secret
                "e.io": {"auth": auth("", "")},
                "d.io": {"auth": "%%%"},
            }
        },
    )
    creds = source(host)
    assert creds.lookup("a.io") == Credentials("u", "p", identity_token="refresh")
    with caplog.at_level(logging.WARNING):
        assert creds.lookup("b.io") is None
    assert "missing semicolon" in caplog.text and "nocolon" not in caplog.text
    assert creds.lookup("c.io") is None
    assert creds.lookup("e.io") is None
    with pytest.raises(ConfigError, match=r"the \"auth\" field of 'd.io' is not valid base64") as info:
        creds.lookup("d.io")
    assert "auth.json" in str(info.value)


def test_bad_json_names_the_file_and_hides_the_content(host: FakeHost) -> None:
    path = host.write(host.runtime / "containers/auth.json", '{"auths": {"a.io": {"auth": "c2VjcmV0"}}')
    with pytest.raises(ConfigError) as info:
        source(host).lookup("a.io")
    assert str(path) in str(info.value) and "invalid JSON" in str(info.value)
    assert "c2VjcmV0" not in str(info.value)
    host.write(host.runtime / "containers/auth.json", "")
    with pytest.raises(ConfigError, match="invalid JSON"):
        source(host).lookup("a.io")
    host.write(host.runtime / "containers/auth.json", '{"auths": []}')
    with pytest.raises(ConfigError, match='"auths" must map registries to objects'):
        source(host).lookup("a.io")


def test_lookup_order_of_keys() -> None:
    assert list(auth_key_lookup_order("quay.io/a/b/c", "quay.io", False)) == [
        "quay.io/a/b/c",
        "quay.io/a/b",
        "quay.io/a",
        "quay.io",
    ]
    assert list(auth_key_lookup_order("quay.io/a/b", "quay.io", True)) == ["quay.io"]
    assert normalize_auth_file_key("https://index.docker.io/v1/", False) == "index.docker.io"
    assert normalize_auth_file_key("quay.io/ns", False) == "quay.io/ns"
    assert normalize_auth_file_key("quay.io/ns", True) == "quay.io"


_label = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


@given(host=st.lists(_label, min_size=1, max_size=3).map(".".join), other=_label, path=st.lists(_label, max_size=3))
def test_lookup_keys_never_leave_the_host(host: str, other: str, path: list[str]) -> None:
    key = "/".join([host, *path])
    keys = list(auth_key_lookup_order(key, host, False))
    assert keys[-1] == host and all(k == host or k.startswith(host + "/") for k in keys)
    assert normalize_auth_file_key(f"https://{host}/{other}", False) in (host, "index.docker.io")


# ---------------------------------------------------------------------------------------------------------------------
# Credential helpers

HELPER_OK = """
if server == "quay.io":
    print(json.dumps({"ServerURL": server, "Username": "helper-user", "Secret": "helper-secret"}))
elif server == "token.io":
    print(json.dumps({"ServerURL": server, "Username": "<token>", "Secret": "refresh"}))
else:
    print("credentials not found in native keychain")
    sys.exit(1)
"""


def test_cred_helpers_entry_is_used_for_its_host(host: FakeHost) -> None:
    host.helper("test", HELPER_OK)
    host.write_json(
        host.runtime / "containers/auth.json",
        {"credHelpers": {"quay.io": "test", "other.io": "test"}, **auths(("quay.io", "file", "x"))},
    )
    host.write_json(host.home / ".docker/config.json", auths(("other.io", "later", "file")))
    creds = source(host)
    assert creds.lookup("quay.io", "a/b") == Credentials("helper-user", "helper-secret")
    # nothing in the helper: the search goes on to later files
    assert creds.lookup("other.io", "a/b") == Credentials("later", "file")


def test_registries_conf_helpers_in_order(host: FakeHost) -> None:
    host.helper("test", HELPER_OK)
    host.write_json(host.runtime / "containers/auth.json", auths(("quay.io", "file", "x"), ("a.io", "file", "a")))
    creds = source(host, credential_helpers=["test", "containers-auth.json"])
    assert creds.lookup("quay.io") == Credentials("helper-user", "helper-secret")
    assert creds.lookup("token.io") == Credentials("", "", identity_token="refresh")
    assert creds.lookup("a.io") == Credentials("file", "a")
    assert source(host, credential_helpers=["test"]).lookup("a.io") is None


def test_missing_helper_is_an_error_naming_helper_and_host(host: FakeHost) -> None:
    host.write_json(host.runtime / "containers/auth.json", {"credHelpers": {"quay.io": "absent"}})
    with pytest.raises(ConfigError, match=r"credential helper docker-credential-absent for quay\.io: .*not found"):
        source(host).lookup("quay.io", "a/b")


def test_helper_errors_are_reported_only_when_nothing_is_found(host: FakeHost) -> None:
    host.write_json(host.runtime / "containers/auth.json", auths(("quay.io", "file", "x")))
    creds = source(host, credential_helpers=["absent", "containers-auth.json"])
    assert creds.lookup("quay.io") == Credentials("file", "x")
    with pytest.raises(ConfigError, match="errors looking up credentials:\n\t\\* credential helper docker-credential-"):
        creds.lookup("b.io")


def test_helper_failure_and_garbage(host: FakeHost) -> None:
    host.helper("fail", 'print("permission denied by keyring"); sys.exit(3)')
    host.helper("garbage", 'print("not json hunter2")')
    with pytest.raises(ConfigError, match=r"docker-credential-fail for q\.io: exit status 3: permission denied"):
        run_credential_helper("fail", "q.io", environ=host.environ)
    with pytest.raises(ConfigError) as info:
        run_credential_helper("garbage", "q.io", environ=host.environ)
    assert "not JSON" in str(info.value) and "hunter2" not in str(info.value)


def test_helper_gets_the_host_on_stdin_and_the_get_action(host: FakeHost) -> None:
    host.helper(
        "echo", 'print(json.dumps({"Username": action, "Secret": server}))'
    )  # the helper sees exactly "get" and the host
    assert run_credential_helper("echo", "localhost:5000", environ=host.environ) == Credentials("get", "localhost:5000")


def test_helper_timeout(host: FakeHost) -> None:
    host.helper("slow", "time.sleep(5)")
    with pytest.raises(ConfigError, match=r"docker-credential-slow for q\.io: no answer after 0\.3 s"):
        run_credential_helper("slow", "q.io", environ=host.environ, timeout=0.3)


def test_creds_store_only_when_enabled(host: FakeHost) -> None:
    host.helper(
        "store",
        'print(json.dumps({"Username": "s", "Secret": server}))',
    )
    host.write_json(
        host.home / ".docker/config.json", {"credsStore": "store", "auths": {"https://index.docker.io/v1/": {}}}
    )
    assert source(host).lookup("docker.io", "library/busybox") is None  # c/image ignores credsStore
    enabled = source(host, docker_creds_store=True)
    assert enabled.lookup("docker.io", "library/busybox") == Credentials("s", "https://index.docker.io/v1/")
    assert enabled.lookup("quay.io", "a") == Credentials("s", "quay.io")


def test_invalid_registry_host(host: FakeHost) -> None:
    with pytest.raises(ConfigError, match="invalid registry host"):
        source(host).lookup("quay.io/ns")
