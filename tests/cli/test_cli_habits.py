"""What a skopeo user types works (issue 18): --version and `version`, global flags before or after the command
(skopeo's deprecated global --tls-verify too, with a warning), copy's --src-* names, errors with the command's own
usage, help that lists a command's own options (each described) and ends with examples, and a refused connection
that fails at once, without retries and without a TLS hint that does not apply."""

from __future__ import annotations

import re
import socket
import time

import pytest

from protocol import PROTOCOL_VERSION
from proxy import __version__
from tests.cli.helpers import image_proxy


def test_version_flag_and_command():
    flag = image_proxy("--version")
    assert flag.returncode == 0 and flag.stdout == f"image-proxy version {__version__} (protocol {PROTOCOL_VERSION})\n"
    command = image_proxy("version")
    assert command.returncode == 0
    assert f"Version:   {__version__}" in command.stdout and f"Protocol:  {PROTOCOL_VERSION}" in command.stdout


def test_tls_verify_before_the_command_works_with_a_warning(registry_images):
    ref = registry_images.ref("test/single")
    result = image_proxy("--tls-verify=false", "inspect", ref)
    assert result.returncode == 0, result.stderr
    assert registry_images.single.manifest_digest in result.stdout
    assert "--tls-verify before the command is deprecated (as in skopeo): give it after 'inspect'" in result.stderr


def test_copy_takes_skopeos_source_flag_names(registry_images, tmp_path):
    ref = registry_images.ref("test/single")
    result = image_proxy("copy", "-q", "--src-tls-verify=false", "--src-no-creds", ref, f"oci:{tmp_path / 'o'}:x")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "index.json").is_file()


def test_global_flags_work_before_and_after_the_command(tmp_path):
    example = "oci:examples/hello:latest"
    before = image_proxy("--override-arch", "arm64", "--policy", "examples/policy.json", "inspect", "--json", example)
    after = image_proxy("inspect", "--json", "--override-arch", "arm64", "--policy", "examples/policy.json", example)
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr
    assert before.stdout == after.stdout


def test_an_unknown_flag_shows_the_commands_usage():
    result = image_proxy("copy", "--bogus", "oci:a", "oci:b")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: image-proxy copy ")
    assert result.stderr.rstrip().endswith("image-proxy copy: error: unrecognized arguments: --bogus")


def _options_and_descriptions(help_text: str) -> dict[str, str]:
    """Each option line of an argparse help text, with the description that follows it (same or next lines)."""
    found: dict[str, str] = {}
    lines = help_text.splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^  (-\w(?: [A-Z_]+)?, --[-\w.]+|--?[-\w.]+)(.*)$", line)
        if not match:
            continue
        rest = match.group(2)
        described = re.sub(r"^( [A-Z_\[\]:.]+| \[[A-Z]+\])*", "", rest).strip()  # drop the metavars
        if not described and number + 1 < len(lines) and lines[number + 1].startswith(" " * 10):
            described = lines[number + 1].strip()
        found[match.group(1)] = described
    return found


@pytest.mark.parametrize("command", ["copy", "inspect", "layers"])
def test_a_commands_help_lists_its_own_options_each_described_and_ends_with_examples(command):
    result = image_proxy(command, "--help")
    assert result.returncode == 0
    options = _options_and_descriptions(result.stdout)
    assert "--proxy-socket" in options
    assert "--override-arch" not in options, "the global options are listed once, by image-proxy --help"
    assert not [name for name, text in options.items() if not text], options
    assert f"\nexamples:\n  image-proxy {command} " in result.stdout
    description = result.stdout.split("\n\n")[1]  # after the usage
    assert not description.startswith(("positional", "options")), "a description line comes first"
    if command == "copy":
        assert "-j JOBS, --jobs" in options and "--src-tls-verify" in result.stdout
        assert "interrupted downloads:" in result.stdout


def test_the_top_level_help_lists_the_global_options_each_described():
    top = image_proxy("--help")
    top_options = _options_and_descriptions(top.stdout)
    assert "--override-arch" in top_options and "--version" in top_options
    assert not [name for name, text in top_options.items() if not text], top_options


def test_a_refused_connection_fails_at_once_without_a_tls_hint():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    result = image_proxy("inspect", "--insecure-policy", f"docker://127.0.0.1:{port}/some/image:latest")
    took = time.monotonic() - started
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}: connection refused" in result.stderr
    assert "gave up after" not in result.stderr and "--tls-verify" not in result.stderr, result.stderr
    assert took < 5, f"{took:.1f} s: a refused connection was retried"  # 4 tries with backoff took 2.6-3.5 s


@pytest.mark.parametrize("action", ["verify", "prune", "du"])
def test_each_cache_action_has_its_own_help(action):
    result = image_proxy("cache", action, "--help")
    assert result.returncode == 0
    cache_text = image_proxy("cache", "--help").stdout.split("\n\n")[1]
    assert cache_text not in result.stdout, "the cache command's text is not repeated"
    assert f"\nexamples:\n  image-proxy cache {action} " in result.stdout
    assert not [name for name, text in _options_and_descriptions(result.stdout).items() if not text]
