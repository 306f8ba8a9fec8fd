"""``SetSessionSettings`` (extension session-settings) in parts: the protocol's check of the settings object, the
credentials a client brings (its auth file's content, never anything of the daemon's), and the relay's side (its
agent's auth file read in its process, a daemon without the extension). The whole path, with the real registry and
daemon: tests/daemon/test_relay_credentials.py."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProtocolViolation
from protocol.session_settings import SessionSettings, parse_session_settings
from proxy.config import ConfigError, Credentials, CredentialSource
from proxy.server import relay

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=12,
)
KNOWN = ("auth_file", "creds", "no_creds", "user_agent_prefix", "password")
KEYS = st.sampled_from([*KNOWN, "other"])


@given(st.one_of(JSON, st.dictionaries(KEYS, JSON, max_size=4)))
def test_any_json_value_is_settings_or_an_error_naming_what_is_wrong(value):
    try:
        settings = parse_session_settings(value)
    except ProtocolViolation as e:
        assert e.message and ("setting" in e.message or "settings object" in e.message)
    else:
        assert isinstance(value, dict) and set(value) <= set(KNOWN)
        assert all(getattr(settings, key) == item for key, item in value.items())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "expecting a settings object, not array"),
        ({"creds": 1}, "session setting creds: expecting a string, not number"),
        ({"no_creds": "yes"}, "session setting no_creds: expecting a boolean, not string"),
        ({"password": "a\x00b"}, "session setting password: contains a NUL character"),
        ({"username": "\udcff"}, "session setting username: not valid Unicode"),
        ({"user_agent_prefix": "x\r\nX-Injected: 1"}, "session setting user_agent_prefix: contains control"),
        ({"registry_token": "t\r\nGET /v2/ HTTP/1.1"}, "session setting registry_token: contains control"),
        ({"auth_file_name": "a\nINFO forged line"}, "session setting auth_file_name: contains control"),
        ({"user_agent_prefix": "agent-é"}, "session setting user_agent_prefix: not ASCII"),
        ({"registry_token": "tokén"}, "session setting registry_token: not ASCII"),
        ({"tls_verify": False}, 'unknown session setting "tls_verify" (known: auth_file,'),
    ],
)
def test_wrong_settings_are_refused_by_name(value, message):
    with pytest.raises(ProtocolViolation) as refused:
        parse_session_settings(value)
    assert message in refused.value.message


def test_settings_never_print_their_secrets():
    settings = parse_session_settings({"creds": "bob:hunter2", "auth_file": '{"auths":{}}', "no_creds": False})
    assert "hunter2" not in repr(settings) and "auths" not in str(settings)
    assert repr(settings) == "SessionSettings(auth_file, creds)"
    assert settings.own_credentials
    assert not SessionSettings(user_agent_prefix="bootc/1.0").own_credentials


def _auth(entries: dict, **extra: object) -> str:
    return json.dumps({"auths": entries, **extra})


def _basic(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_clients_auth_file_gives_its_entries_and_nothing_of_the_daemons(tmp_path, monkeypatch):
    """The daemon's own auth files (here: a HOME with a docker config for the same host) are never consulted."""
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker/config.json").write_text(_auth({"other.example": _basic("root", "daemon-secret")}))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / ".docker/config.json"))
    source = CredentialSource.of_client(
        auth_file=_auth({"quay.io/team": _basic("bob", "s3cret")}), auth_file_name="/proc/self/fd/100"
    )
    assert source.lookup("quay.io", "team/app") == Credentials("bob", "s3cret")
    assert source.lookup("quay.io", "other/app") is None
    assert source.lookup("other.example", "x") is None


def test_a_clients_missing_auth_file_holds_no_credentials():
    assert CredentialSource.of_client(auth_file="", auth_file_name="/run/none.json").lookup("quay.io", "x") is None


def test_flags_come_before_the_file_as_for_skopeo():
    source = CredentialSource.of_client(auth_file=_auth({"quay.io": _basic("bob", "file")}), creds="alice:flag")
    assert source.lookup("quay.io", "x") == Credentials("alice", "flag")
    assert CredentialSource.of_client(no_creds=True).lookup("quay.io", "x") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_auth({}, credHelpers={"quay.io": "secretservice"}), 'auth file "/proc/self/fd/100" names credential helpers'),
        (_auth({}, credsStore="desktop"), 'auth file "/proc/self/fd/100" names credential helpers'),
        (_auth({"quay.io": {"auth": "%%%"}}), "is not valid base64"),
        ("{", 'reading JSON file "/proc/self/fd/100": invalid JSON'),
    ],
)
def test_an_auth_file_the_daemon_cannot_use_is_refused_naming_it(content, message):
    with pytest.raises(ConfigError) as refused:
        CredentialSource.of_client(auth_file=content, auth_file_name="/proc/self/fd/100")
    assert message in str(refused.value)


def test_creds_and_no_creds_together_are_skopeos_error():
    with pytest.raises(ConfigError, match="creds and no-creds cannot be specified at the same time"):
        CredentialSource.of_client(creds="a:b", no_creds=True)


# ------------------------------------------------------------------------------------------------ the relay's side


def test_the_relay_reads_the_agents_auth_file(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text(_auth({"quay.io": _basic("bob", "s3cret")}))
    settings = relay.session_settings({"authfile": str(path), "no_creds": True, "user_agent_prefix": "bootc/1"})
    assert settings == {
        "auth_file": path.read_text(),
        "auth_file_name": str(path),
        "no_creds": True,
        "user_agent_prefix": "bootc/1",
    }
    assert relay.session_settings({"authfile": str(tmp_path / "none.json")})["auth_file"] == ""


def test_an_auth_file_the_relay_cannot_forward_says_why(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 40_000)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe")
    assert "larger than a request to the daemon can carry" in relay.session_settings({"authfile": str(big)})
    assert "is not UTF-8" in relay.session_settings({"authfile": str(binary)})
    assert "Is a directory" in relay.session_settings({"authfile": str(tmp_path)})


def _one_answer_daemon(path: Path, answers: list[dict]) -> threading.Thread:
    """A socket at ``path`` that answers one connection's requests with ``answers`` in turn, then closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                for answer in answers:
                    if not conn.recv(1 << 16):
                        return
                    conn.send(json.dumps(answer).encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_daemon_without_the_extension_does_not_take_an_agent_with_credentials(tmp_path):
    path = tmp_path / "old.sock"
    thread = _one_answer_daemon(path, [{"success": True, "value": ["request-ids"]}])
    answer = relay.connect(str(path), {"no_creds": True})
    thread.join(10)
    assert answer == "the daemon does not take a client's settings (no extension session-settings)"


def test_a_daemon_that_refuses_the_settings_says_why(tmp_path):
    path = tmp_path / "refusing.sock"
    refusal = {"success": False, "value": None, "error": "SetSessionSettings: auth file names credential helpers"}
    thread = _one_answer_daemon(path, [{"success": True, "value": ["session-settings"]}, refusal])
    answer = relay.connect(str(path), {"auth_file": "{}"})
    thread.join(10)
    assert answer == "the daemon refused: SetSessionSettings: auth file names credential helpers"


def test_an_auth_file_entry_that_is_not_utf8_goes_out_as_its_bytes():
    """Go sends the bytes of an auth file's ``auth`` as they are; so do we (it was an internal error)."""
    from proxy.registry.auth import basic_authorization

    raw = base64.b64encode(b"\xff\xfebob:pw").decode()
    found = CredentialSource.of_client(auth_file=_auth({"quay.io": {"auth": raw}})).lookup("quay.io", "x")
    header = basic_authorization(found.username, found.password)
    assert base64.b64decode(header.removeprefix("Basic ")) == b"\xff\xfebob:pw"


def test_an_empty_authfile_flag_is_not_forwarded():
    """skopeo reads its default files for ``--authfile ""``: the relay forwards no auth file for it."""
    assert relay.session_settings({"authfile": "", "no_creds": True}) == {"no_creds": True}


def test_a_relay_serving_its_client_itself_keeps_what_it_read(tmp_path):
    """An auth file handed over as a pipe is empty on a second reading: the process's own proxy gets a copy."""
    read, write = os.pipe()
    os.write(write, b'{"auths": {}}')
    os.close(write)
    try:
        settings = relay.session_settings({"authfile": f"/proc/self/fd/{read}"})
    finally:
        os.close(read)
    copy = relay.auth_file_copy(settings)
    try:
        assert Path(copy).read_text() == '{"auths": {}}'
    finally:
        os.close(int(copy.rsplit("/", 1)[1]))
    assert relay.auth_file_copy({"auth_file": ""}) is None
