import re
from pathlib import Path

import pytest

from proxy.config import ConfigError
from proxy.config.daemon_conf import DaemonConfig, load_daemon_conf, parse_daemon_conf

P = Path("/x/config.toml")


def test_all_keys():
    conf = parse_daemon_conf(
        "[registry]\nconnect-timeout = 5\ntls-handshake-timeout = 2.5\nresponse-header-timeout = 7\n"
        "stall-timeout = 1\nmax-resumes = 0\n",
        P,
    )
    assert conf == DaemonConfig(
        connect_timeout=5,
        tls_handshake_timeout=2.5,
        response_header_timeout=7,
        stall_timeout=1,
        max_resumes=0,
        path=P,
    )


def test_empty_file_sets_nothing():
    assert parse_daemon_conf("", P) == DaemonConfig(path=P)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[registry\n", "not valid TOML"),
        ("[caches]\n", "unknown section or key 'caches'"),
        ("[registry]\nstall = 3\n", "unknown key [registry] 'stall'"),
        ("[registry]\nstall-timeout = 0\n", "positive number of seconds"),
        ("[registry]\nstall-timeout = 'soon'\n", "must be a number"),
        ("[registry]\nmax-resumes = 1.5\n", "whole number"),
        ("[registry]\nmax-resumes = -1\n", "must not be negative"),
        ("registry = 3\n", "must be a table"),
        ("[cache]\nmax-size = 'lots'\n", "[cache] max-size is an invalid size 'lots'"),
        ("[cache]\nenabled = 1\n", "[cache] enabled must be true or false"),
        ("[limits]\nmax-request-size = 100000\n", "must be at most 32768"),
        ("[limits]\nconcurrent-requests = 0\n", "must be at least 1"),
        ("[daemon]\nsocket-mode = 660\n", "octal mode in a string"),
        ("[daemon]\nallow-uids = ['no-such-user-here']\n", "names a user 'no-such-user-here', which does not"),
        ("[daemon]\nallow-gids = 0\n", "must be a list"),
        ("[daemon]\nshutdown-grace = -1\n", "0 or more"),
    ],
)
def test_errors_name_the_file_and_the_key(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        parse_daemon_conf(text, P)
    assert str(info.value).startswith(f"{P}: ")


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_daemon_conf(tmp_path / "nope.toml")


def test_reads_the_named_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[registry]\nmax-resumes = 3\n")
    assert load_daemon_conf(path).max_resumes == 3


def test_cache_limits_and_daemon_sections():
    conf = parse_daemon_conf(
        "[cache]\nenabled = false\ndir = '/c'\nmax-size = '1.5G'\n"
        "[limits]\nopen-images = 2\nopen-pipes = 0\nrequests-per-second = 10\nrequest-burst = 5\n"
        "max-request-size = 1024\nconcurrent-requests = 4\n"
        "[daemon]\nlisten = '/run/x.sock'\nsocket-group = 'root'\nsocket-mode = '0600'\n"
        "allow-uids = [0, 'root', 1000]\nallow-gids = ['root', 7]\nshutdown-grace = 0\n",
        P,
    )
    assert (conf.cache_enabled, conf.cache_dir, conf.cache_max_size) == (False, "/c", 3 << 29)
    assert (conf.open_images, conf.open_pipes, conf.requests_per_second, conf.request_burst) == (2, 0, 10, 5)
    assert (conf.max_request_size, conf.concurrent_requests) == (1024, 4)
    assert (conf.listen, conf.socket_group, conf.socket_mode) == ("/run/x.sock", 0, 0o600)
    assert conf.allow_uids == {0, 1000} and conf.allow_gids == {0, 7} and conf.shutdown_grace == 0
