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
    assert conf == DaemonConfig(5, 2.5, 7, 1, 0, P)


def test_empty_file_sets_nothing():
    assert parse_daemon_conf("", P) == DaemonConfig(path=P)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[registry\n", "not valid TOML"),
        ("[cache]\n", "unknown section or key 'cache'"),
        ("[registry]\nstall = 3\n", "unknown key [registry] 'stall'"),
        ("[registry]\nstall-timeout = 0\n", "positive number of seconds"),
        ("[registry]\nstall-timeout = 'soon'\n", "must be a number"),
        ("[registry]\nmax-resumes = 1.5\n", "whole number"),
        ("[registry]\nmax-resumes = -1\n", "must not be negative"),
        ("registry = 3\n", "must be a table"),
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
