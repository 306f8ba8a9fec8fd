"""README's resume budget with its default numbers (only ``--stall-timeout 1`` set, to keep it quick): the daemon,
the real registry and the fault proxy between them (see test_matrix.py, whose daemon and helpers this uses).

README, "Stall-proof blob streaming": "at most ``--max-resumes`` resumes per blob (10), and at most 2 resumes in a
row that each brought less than 1 MiB and came within 60 s of the previous one. So a transfer that stops for good
[...] is reported after at most four stalls (the one that stopped it, then three resumes that bring nothing)".

The fault matrix runs its give-up cases with ``--max-resumes 3``, which stops after four stalls whether or not the
"in a row" rule exists; here ``--max-resumes`` keeps its default, so only that rule can end the transfer early.
The numbers are read from README (tests/support/documented.py). Plain HTTP only: the budget does not depend on the
transport, which test_matrix.py covers.
"""

from __future__ import annotations

import trio

from tests.faults.conftest import FaultImages
from tests.faults.proxy import FaultProxy, Stall
from tests.faults.test_matrix import (
    HANG_GUARD,
    SEED_OFFSET,
    STALL,
    STALL_SLACK,
    assert_gave_up,
    blob_path,
    daemon,
    fetch_blob,
    requests_for,
)
from tests.support.documented import README, number, numbers

TRANSPORTS = ("plain",)
#: README: at most --max-resumes resumes per blob (10), at most 2 in a row after attempts that brought < 1 MiB
MAX_RESUMES, IN_A_ROW, PROGRESS_MIB, PROGRESS_SECONDS = numbers(
    README,
    r"at most `--max-resumes` resumes per blob \((\d+)\), and at most (\d+) resumes in a row after attempts that "
    r"each brought less than (\d+) MiB and came within (\d+) s of the previous one",
)
#: README: "is reported after at most four stalls (the one that stopped it, then three resumes that bring nothing)"
STALLS_FOR_GOOD = number(README, r"is reported after at most (\w+) stalls \(the one that stopped it")
#: only the stall deadline is shortened; --max-resumes keeps its default
FLAGS = ("--tls-verify=false", "--stall-timeout", str(int(STALL)))


async def test_a_blob_that_stops_for_good_after_progress_is_given_up_after_four_stalls(
    fault: FaultProxy, fault_images: FaultImages
) -> None:
    """README's own example: the seed blob's CDN stops for good at 76 % (2.1 MB, more than 1 MiB, came first)."""
    assert (MAX_RESUMES, IN_A_ROW, PROGRESS_MIB, PROGRESS_SECONDS, STALLS_FOR_GOOD) == (10, 2, 1, 60, 4)
    layer = fault_images.seed
    assert SEED_OFFSET >= PROGRESS_MIB << 20  # the first request made progress
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault, FLAGS) as d:
            image = await d.open(fault_images)
            fault.add_rule(Stall(at=SEED_OFFSET), path=blob_path(layer))
            started = trio.current_time()
            delivered, error = await fetch_blob(d.proxy, image, layer)
            elapsed = trio.current_time() - started
            assert_gave_up(error, fault, SEED_OFFSET)
            assert delivered == layer.data[:SEED_OFFSET]
            attempts = requests_for(fault, layer)
            assert len(attempts) == STALLS_FOR_GOOD, [(r.range, r.outcome) for r in attempts]
            assert all(r.outcome == "stalled" for r in attempts)
            assert f"after {STALLS_FOR_GOOD - 1} resumes" in str(error), str(error)
            # "about 4 x --stall-timeout plus three re-requests"
            assert elapsed < STALLS_FOR_GOOD * (STALL + STALL_SLACK), elapsed
            await d.assert_no_leaks()


async def test_resumes_that_bring_less_than_a_mib_stop_after_two_in_a_row(
    fault: FaultProxy, fault_images: FaultImages
) -> None:
    """A blob that stops for good after 100 KB: neither its first request nor any resume brings 1 MiB, so at most
    2 resumes are made (3 requests), not the 10 that --max-resumes allows."""
    layer = fault_images.seed
    stop = 100_000
    assert stop < PROGRESS_MIB << 20
    with trio.fail_after(HANG_GUARD):
        async with daemon(fault, FLAGS) as d:
            image = await d.open(fault_images)
            fault.add_rule(Stall(at=stop), path=blob_path(layer))
            delivered, error = await fetch_blob(d.proxy, image, layer)
            assert_gave_up(error, fault, stop)
            assert delivered == layer.data[:stop]
            attempts = requests_for(fault, layer)
            assert 1 + IN_A_ROW < MAX_RESUMES  # so that the rule, not --max-resumes, is what stops it
            assert len(attempts) <= 1 + IN_A_ROW, [(r.range, r.outcome) for r in attempts]
            assert len(attempts) <= STALLS_FOR_GOOD
            await d.assert_no_leaks()
