"""The differential walk against skopeo, through the relay (issue 22): each case of
tests/integration/test_differential.py, with our side an ``image-proxy experimental-image-proxy`` spawned with
nothing but ``--config`` (``[spawned] daemon = SOCKET``), relaying to a daemon that was given the case's flags.
The transcripts must agree with skopeo's as they do for a spawned proxy, and the daemon must have served them."""

from __future__ import annotations

import sys

import pytest
import trio

from tests.integration.test_differential import (  # noqa: F401  (corrupted_ref is a fixture)
    CASES,
    assert_five_keys,
    assert_transcripts_agree,
    corrupted_ref,
    run,
    scenario_args,
    to_image_spec_1_1,
)


@pytest.mark.parametrize("name", CASES)
async def test_through_the_relay_ours_matches_skopeo(
    name,
    start_daemon,
    layouts,
    skopeo_proxy_argv,
    corrupted_ref,  # noqa: F811  (the fixture imported above)
    tmp_path,
):
    case = CASES[name]
    daemon = await start_daemon(*case.flags, "--no-blob-cache")  # the case's flags are the daemon's settings
    config = tmp_path / "config.toml"
    config.write_text(f'[spawned]\ndaemon = "{daemon.socket_path}"\n')
    relay_argv = [sys.executable, "-m", "proxy", "experimental-image-proxy", "--config", str(config)]
    extra = scenario_args(case, layouts, corrupted_ref)
    theirs, _ = await trio.to_thread.run_sync(
        run, case.scenario, [*skopeo_proxy_argv, *case.flags], layouts, extra, case.sockfd_mode
    )
    ours, received = await trio.to_thread.run_sync(run, case.scenario, relay_argv, layouts, extra, case.sockfd_mode)
    assert_five_keys(received)
    case.expect({step.label: step for step in ours}, layouts)
    assert_transcripts_agree(to_image_spec_1_1(theirs), ours)
    await daemon.wait_for_log(r"connection from pid \d+ uid \d+")  # it went through the daemon
