"""Update agents that pass credentials still get the daemon (issue 22): rpm-ostree and bootc spawn their proxy with
``--authfile /proc/self/fd/100`` (or ``--no-creds``); the relay reads the agent's auth file and forwards it, with the
agent's other credential flags, as its connection's settings (``SetSessionSettings``, docs/PROTOCOL.md). The
daemon itself has no credentials here: the registry is the real one with htpasswd auth, behind the fault proxy,
which counts what it serves. What a client's credentials fetched into the shared cache is never served to a client
that has not shown the registry it may read it."""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from protocol.client import ImageProxy
from protocol.errors import ProxyError
from tests.daemon.test_relay import AGENT, PULL_GUARD, Agent, killed_mid_pull_then_pulled_again, relay_config
from tests.faults.conftest import FaultImages, push_fault_images
from tests.faults.proxy import FaultProxy, fault_proxy

PASSWORD = "agent-s3cret"
REPOSITORY = "private/faults"


def auth_json(port: int, password: str = PASSWORD, **extra: object) -> bytes:
    """A containers-auth.json(5) file with bob's credentials for the fault proxy's address."""
    token = base64.b64encode(f"bob:{password}".encode()).decode()
    return json.dumps({"auths": {f"127.0.0.1:{port}": {"auth": token}}, **extra}).encode()


def trusting(tmp_path: Path, port: int) -> dict[str, str]:
    """The environment of an agent whose own proxy (when it serves itself) may use the plain-HTTP registry at
    ``port``, as the daemon does (--tls-verify=false): a registries.conf marking it insecure."""
    registries = tmp_path / "registries.conf"
    registries.write_text(f'[[registry]]\nlocation = "127.0.0.1:{port}"\ninsecure = true\n')
    return {"CONTAINERS_REGISTRIES_CONF": str(registries)}


@pytest.fixture(scope="module")
def private(registry_images, tmp_path_factory) -> Iterator[FaultImages]:
    """test/faults' layers (seed, long, small) in a registry of their own that only bob may read (htpasswd)."""
    from tests.http.registry import RegistryOptions, write_htpasswd
    from tests.support.registry import registry_process

    workdir = tmp_path_factory.mktemp("private-registry")
    options = RegistryOptions(htpasswd=write_htpasswd(workdir / "htpasswd", {"bob": PASSWORD}))
    with registry_process(workdir / "registry", options) as registry:
        creds = f"--dest-creds=bob:{PASSWORD}"
        yield push_fault_images(workdir / "layout", registry.authority, registry_images, creds, repository=REPOSITORY)


@pytest.fixture
async def guarded(private: FaultImages) -> AsyncIterator[FaultProxy]:
    """The fault proxy in front of the private registry."""
    async with fault_proxy(private.registry_port) as proxy:
        yield proxy


def served(fault: FaultProxy, digest: str) -> int:
    """Bytes of ``digest``'s body the registry sent (through the fault proxy), in every answer."""
    return sum(r.body_sent for r in fault.requests_for(f"/blobs/{digest}") if r.status in (200, 206))


def layers(images: FaultImages) -> tuple:
    return (images.seed, images.long, images.small)


async def test_two_agents_with_auth_files_share_one_download(start_daemon, guarded, private, tmp_path):
    """Both spawn their proxy as rpm-ostree does (socket on stdin, stdout to /dev/null, the auth file on fd 100);
    the daemon has no credentials of its own. The registry serves each blob once, for both."""
    daemon = await start_daemon("--insecure-policy", "--no-creds", "--blob-cache", str(tmp_path / "cache"))
    config = relay_config(tmp_path, daemon.socket_path)
    agents = [Agent("--config", str(config), auth=auth_json(guarded.port)) for _ in range(2)]
    try:
        async with trio.open_nursery() as nursery:
            for agent in agents:
                nursery.start_soon(agent.pull, private.ref(guarded.port, REPOSITORY))
        for agent in agents:
            assert "serving this client here" not in await agent.stderr()
    finally:
        for agent in agents:
            agent.kill()
    for layer in layers(private):
        assert served(guarded, layer.digest) == layer.size, "each blob once from the registry, for both agents"
    for agent in agents:  # the daemon served them, with the agent's credentials
        await daemon.wait_for_log(rf"connection from pid {agent.process.pid} uid {os.getuid()}\b")
    assert not [line for line in daemon.log if PASSWORD in line or "Ym9i" in line]  # no secret in its log


async def test_an_agent_killed_mid_pull_gets_the_rest_from_the_partial(start_daemon, guarded, private, tmp_path):
    cache = tmp_path / "cache"
    daemon = await start_daemon("--insecure-policy", "--no-creds", "--blob-cache", str(cache))
    config = relay_config(tmp_path, daemon.socket_path)
    reference = private.ref(guarded.port, REPOSITORY)
    auth = auth_json(guarded.port)
    resumed = await killed_mid_pull_then_pulled_again(guarded, reference, private.long, cache, config, auth=auth)
    assert resumed and all(r is not None and not r.startswith("bytes=0-") for r in resumed), resumed


async def test_with_the_daemon_stopped_the_agent_pulls_by_itself(guarded, private, tmp_path):
    config = relay_config(tmp_path, tmp_path / "stopped.sock")
    agent = Agent("--config", str(config), auth=auth_json(guarded.port), env=trusting(tmp_path, guarded.port))
    try:
        err = await agent.pull_and_exit(private.ref(guarded.port, REPOSITORY))
    finally:
        agent.kill()
    assert [line for line in err.splitlines() if "serving this client here" in line], err
    for layer in layers(private):
        assert served(guarded, layer.digest) == layer.size


async def test_a_wrong_password_is_the_agents_error_not_the_daemons_credentials(
    start_daemon, guarded, private, tmp_path
):
    """The daemon's own credentials (here: bob's, through --creds) are not used for a client that brought its own."""
    daemon = await start_daemon("--insecure-policy", "--creds", f"bob:{PASSWORD}", "--no-blob-cache")
    agent = Agent("--config", str(relay_config(tmp_path, daemon.socket_path)), auth=auth_json(guarded.port, "wrong"))
    try:
        with pytest.raises(ProxyError, match=r"401|unauthorized|authentication required"):
            await agent.pull(private.ref(guarded.port, REPOSITORY))
    finally:
        agent.kill()
    await daemon.wait_for_log(rf"connection from pid {agent.process.pid} ")  # it was the daemon that refused


async def test_an_auth_file_naming_helpers_is_served_by_the_agent_itself(start_daemon, guarded, private, tmp_path):
    """A helper would run as the daemon, with its secrets: the daemon refuses such a file, and the agent's own
    proxy serves it (its bob entry for this host is enough)."""
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache")
    auth = auth_json(guarded.port, credHelpers={"registry.example": "secretservice"})
    config = relay_config(tmp_path, daemon.socket_path)
    agent = Agent("--config", str(config), auth=auth, env=trusting(tmp_path, guarded.port))
    try:
        err = await agent.pull_and_exit(private.ref(guarded.port, REPOSITORY))
    finally:
        agent.kill()
    lines = [line for line in err.splitlines() if "serving this client here" in line]
    assert len(lines) == 1 and "credential helpers" in lines[0] and "/proc/self/fd/100" in lines[0], err


def _session(path: Path, settings: dict | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(path))
    if settings is not None:
        sock.send(json.dumps({"method": "SetSessionSettings", "args": [settings]}).encode())
        assert json.loads(sock.recv(1 << 16))["success"] is True
    return sock


@pytest.mark.parametrize("settings", [None, {"no_creds": True}], ids=["daemon-credentials", "no-creds"])
async def test_a_client_gets_no_private_blob_from_the_cache(start_daemon, guarded, private, tmp_path, settings):
    """An agent with bob's credentials fetched the private layers into the shared cache. Another client, with the
    daemon's credentials (none) or --no-creds, opens an image in a repository it may read (on another registry,
    as an attacker's own would be) and asks for a private layer by digest: that registry answers for it (blob
    unknown there), never the cache, which holds the layer only for the private repository. It cannot open the
    private image either. (A manifest naming the digest changes nothing: tests/unit/test_blobstore.py.)"""
    daemon = await start_daemon("--insecure-policy", "--no-creds", "--blob-cache", str(tmp_path / "cache"))
    agent = Agent("--config", str(relay_config(tmp_path, daemon.socket_path)), auth=auth_json(guarded.port))
    try:
        await agent.pull(private.ref(guarded.port, REPOSITORY))
    finally:
        agent.kill()
    layer = private.small
    public = private.standard.ref("test/single")
    with trio.fail_after(PULL_GUARD):
        async with ImageProxy.connect(_session(daemon.socket_path, settings)) as proxy:
            image = await proxy.open_image(public)
            with pytest.raises(ProxyError, match=r"blob unknown|not found|404") as refused:  # not from the cache
                await proxy.get_blob(image, layer.digest, layer.size)
            assert layer.digest in str(refused.value)
            with pytest.raises(ProxyError, match=r"401|unauthorized|authentication required"):
                await proxy.open_image(private.ref(guarded.port, REPOSITORY))


async def _call(sock: socket.socket, method: str, *args: object) -> dict:
    """One request and its answer, in a thread: the fault proxy runs in this test's event loop."""

    def call() -> dict:
        sock.send(json.dumps({"method": method, "args": list(args)}).encode())
        return json.loads(sock.recv(1 << 16))

    return await trio.to_thread.run_sync(call)


async def test_settings_come_once_before_the_first_registry_image(start_daemon, guarded, private, tmp_path):
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache")
    auth = auth_json(guarded.port).decode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(PULL_GUARD)
        sock.connect(str(daemon.socket_path))
        assert "session-settings" in (await _call(sock, "GetCapabilities"))["value"]
        # before Initialize, as a relay sends it
        assert (await _call(sock, "SetSessionSettings", {"auth_file": auth}))["success"]
        again = await _call(sock, "SetSessionSettings", {"no_creds": True})
        assert again["error"] == "SetSessionSettings: only once per connection, before the first OpenImage"
        assert (await _call(sock, "Initialize"))["success"]
        opened = await _call(sock, "OpenImage", private.ref(guarded.port, REPOSITORY))
        assert opened["success"], opened  # with the auth file's bob
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(PULL_GUARD)
        sock.connect(str(daemon.socket_path))
        assert (await _call(sock, "Initialize"))["success"]
        refused = await _call(sock, "OpenImage", private.ref(guarded.port, REPOSITORY))
        assert not refused["success"] and "401" in refused["error"], refused  # the daemon has no credentials
        late = await _call(sock, "SetSessionSettings", {"auth_file": auth})
        assert late["error"] == "SetSessionSettings: only once per connection, before the first OpenImage"


async def test_through_the_relay_with_an_auth_file_ours_matches_skopeo(
    start_daemon, private, skopeo_proxy_argv, tmp_path
):
    """The differential walk (tests/integration/test_differential.py's read_image) on the private registry: skopeo's
    proxy with ``--authfile``, against a relay given the same flag, to a daemon without credentials."""
    from tests.integration.test_differential import assert_five_keys, assert_transcripts_agree, read_image, run

    authfile = tmp_path / "auth.json"
    authfile.write_bytes(auth_json(private.registry_port))
    daemon = await start_daemon("--insecure-policy", "--no-creds", "--blob-cache", str(tmp_path / "cache"))
    relay_argv = [*AGENT, "--config", str(relay_config(tmp_path, daemon.socket_path)), "--authfile", str(authfile)]
    skopeo_argv = [*skopeo_proxy_argv, "--tls-verify=false", "--authfile", str(authfile)]
    extra = {"ref": private.ref(private.registry_port, REPOSITORY)}
    images = private.standard.images
    theirs, _ = await trio.to_thread.run_sync(run, read_image, skopeo_argv, images, extra)
    ours, received = await trio.to_thread.run_sync(run, read_image, relay_argv, images, extra)
    assert_five_keys(received)
    steps = {step.label: step for step in ours}
    assert steps["OpenImage"].reply["success"] and steps["GetManifest"].reply["value"] == private.manifest_digest
    assert len([label for label in steps if label.startswith("GetBlob layer")]) == 3
    assert_transcripts_agree(theirs, ours)
    await daemon.wait_for_log(r"connection from pid \d+ uid \d+")  # it went through the daemon


async def test_no_secret_reaches_the_daemons_log(start_daemon, guarded, private, tmp_path):
    """With --debug, which logs every request: the settings show as their keys, accepted or refused."""
    daemon = await start_daemon("--insecure-policy", "--no-blob-cache", "--debug")
    sent = [
        {"auth_file": auth_json(guarded.port).decode(), "password": "pw-" + PASSWORD, "username": "bob"},
        {"creds": f"bob:{PASSWORD}", "no_creds": True},  # refused: skopeo's conflict
        {"registry_token": "tok-" + PASSWORD, "auth_file": "{not json " + PASSWORD},  # refused: not JSON
    ]
    for settings in sent:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(PULL_GUARD)
            sock.connect(str(daemon.socket_path))
            answer = await _call(sock, "SetSessionSettings", settings)
            assert answer["success"] is (settings is sent[0]), answer
            assert PASSWORD not in answer["error"]
            await daemon.wait_for_log(r"SetSessionSettings")
    await daemon.wait_for_log(r"SetSessionSettings \[\{.registry_token., .auth_file.\}\] failed")
    secrets = (PASSWORD, base64.b64encode(f"bob:{PASSWORD}".encode()).decode())
    assert not [line for line in daemon.log if any(secret in line for secret in secrets)]
