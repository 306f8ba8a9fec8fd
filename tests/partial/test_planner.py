"""The range planner (sans-I/O): spans, units, what a host is known to do, putting parts back together."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.partial.planner import (
    BATCH_MAX_BYTES,
    MAX_RANGES_PER_REQUEST,
    MERGE_GAP,
    PROBE_MAX_BYTES,
    PROBE_MIN_BYTES,
    SMALL_SPAN,
    ByteMap,
    ByteRange,
    HostRanges,
    RangeError,
    Span,
    SpanCutter,
    Support,
    check_within,
    multi_range_header,
    plan_spans,
    plan_units,
    probe_choice,
    probe_ranges,
    union,
)

BLOB = bytes(range(256)) * 64  # 16 KiB of known bytes


def ranges_strategy(size: int = len(BLOB), max_ranges: int = 30):
    return st.lists(
        st.integers(0, size - 1).flatmap(lambda o: st.builds(ByteRange, st.just(o), st.integers(1, size - o))),
        min_size=1,
        max_size=max_ranges,
    )


def output_of(spans: list[Span], chunk: int) -> bytes:
    """What the copy task writes: each span fetched whole, fed to a cutter in ``chunk``-byte reads."""
    out = bytearray()
    for span in spans:
        cutter = SpanCutter(span)
        data = BLOB[span.offset : span.end]
        for i in range(0, len(data), chunk):
            for piece in cutter.feed(data[i : i + chunk]):
                out += piece
        assert cutter.done
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(ranges=ranges_strategy(), gap=st.sampled_from([0, 1, 100, MERGE_GAP]), chunk=st.integers(1, 5000))
def test_spans_carry_every_range_in_request_order(ranges, gap, chunk):
    spans = plan_spans(ranges, gap)
    assert output_of(spans, chunk) == b"".join(BLOB[r.offset : r.end] for r in ranges)
    # every span is read front to back once: its pieces go forward and do not overlap
    for span in spans:
        assert span.pieces[0].offset == span.offset and span.pieces[-1].end == span.end
        for a, b in zip(span.pieces, span.pieces[1:], strict=False):
            assert a.end <= b.offset <= a.end + gap
    # the gaps fetched and dropped are bounded by the merge threshold
    assert sum(s.length for s in spans) - sum(r.length for r in ranges) <= gap * len(ranges)


def test_close_ranges_merge_far_ones_do_not():
    spans = plan_spans([ByteRange(0, 10), ByteRange(10 + MERGE_GAP, 5), ByteRange(20 + 2 * MERGE_GAP, 5)])
    assert [(s.offset, s.length) for s in spans] == [(0, 15 + MERGE_GAP), (20 + 2 * MERGE_GAP, 5)]


def test_backward_and_overlapping_ranges_start_new_spans():
    spans = plan_spans([ByteRange(100, 10), ByteRange(0, 10), ByteRange(5, 10)])
    assert [(s.offset, s.length) for s in spans] == [(100, 10), (0, 10), (5, 10)]


def test_check_within_names_the_range_and_the_size():
    check_within([ByteRange(0, 10)], 10, "blob X")
    with pytest.raises(RangeError, match=r"range 1 \(offset 5, length 6\) is outside blob X, which has 10 bytes"):
        check_within([ByteRange(0, 1), ByteRange(5, 6)], 10, "blob X")


def test_units_batch_small_spans_and_stream_large_ones():
    spans = [Span(i * 10_000, 100, (ByteRange(i * 10_000, 100),)) for i in range(5)]
    big = Span(10**9, SMALL_SPAN + 1, (ByteRange(10**9, SMALL_SPAN + 1),))
    units = plan_units([*spans[:3], big, *spans[3:]], batch_size=2)
    assert [(len(u.spans), u.streamed) for u in units] == [(2, False), (1, False), (1, True), (2, False)]
    assert all(len(u.spans) == 1 for u in plan_units(spans, batch_size=1))
    many = [Span(i * 2 << 20, 1 << 20, (ByteRange(i * 2 << 20, 1 << 20),)) for i in range(10)]
    assert all(u.length <= BATCH_MAX_BYTES for u in plan_units(many, batch_size=64))


def test_host_state_machine():
    host = HostRanges()
    assert not host.wants_probe(2)  # two ranges (TOC + tar-split): single requests, no probe
    assert host.wants_probe(3)  # worth probing
    assert host.batch_size() == 1  # never several ranges in one request before a probe answered
    host.multipart_seen()  # the probe got its three bytes
    assert host.support is Support.MULTI and host.batch_size() == MAX_RANGES_PER_REQUEST
    assert not host.wants_probe(100)
    host.refused()  # 400 / 416 to a later request
    assert host.max_ranges == MAX_RANGES_PER_REQUEST // 2 and host.batch_size() == MAX_RANGES_PER_REQUEST // 2
    host.whole_body_seen()  # 200: never again
    assert host.support is Support.SINGLE and host.batch_size() == 1 and not host.wants_probe(100)
    halving = HostRanges(Support.MULTI)
    for _ in range(10):
        halving.refused()
    assert halving.max_ranges == 1 and halving.support is Support.SINGLE
    refusing = HostRanges()
    refusing.probe_refused()  # 400 / 416 to the probe's three ranges
    assert refusing.support is Support.SINGLE and refusing.batch_size() == 1 and not refusing.wants_probe(100)


def test_probe_choice_is_the_smallest_blob_that_can_be_probed():
    blobs = [("big", 100 << 20), ("config", 1500), ("tiny", PROBE_MIN_BYTES - 1), ("config", 1500)]
    blobs += [("edge", PROBE_MAX_BYTES), ("over", PROBE_MAX_BYTES + 1), ("layer", 9000)]
    assert probe_choice(blobs) == [("config", 1500), ("layer", 9000), ("edge", PROBE_MAX_BYTES)]
    assert probe_choice([("big", 100 << 20)]) == []


@pytest.mark.parametrize("size", [PROBE_MIN_BYTES, 6, 1500, PROBE_MAX_BYTES])
def test_probe_ranges_are_three_separate_bytes(size):
    ranges = probe_ranges(size)
    assert [r.length for r in ranges] == [1, 1, 1]
    assert ranges[0].offset == 0 and ranges[-1].end == size
    # not touching: a server cannot answer them as one range without coalescing what it was not asked for
    assert all(b.offset > a.end for a, b in itertools.pairwise(ranges))
    assert union(ranges) == ranges


def test_a_blob_too_small_to_probe():
    with pytest.raises(ValueError, match="too small"):
        probe_ranges(PROBE_MIN_BYTES - 1)


def test_union_and_header():
    got = union([ByteRange(50, 10), ByteRange(0, 10), ByteRange(5, 10), ByteRange(15, 1)])
    assert got == [ByteRange(0, 16), ByteRange(50, 10)]
    assert multi_range_header(got) == "bytes=0-15,50-59"


@settings(max_examples=200, deadline=None)
@given(
    wanted=ranges_strategy(max_ranges=8),
    cuts=st.lists(st.integers(0, len(BLOB)), max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_bytemap_puts_reordered_and_coalesced_parts_back_together(wanted, cuts, order):
    # the server answers with the union of what was asked, cut anywhere and sent in any order
    parts = []
    for r in union(wanted):
        bounds = sorted({r.offset, r.end, *(c for c in cuts if r.offset < c < r.end)})
        parts += [(a, BLOB[a:b]) for a, b in itertools.pairwise(bounds)]
    order.shuffle(parts)
    received = ByteMap()
    for offset, data in parts:
        received.add(offset, data)
    for r in wanted:
        assert received.extract(r) == BLOB[r.offset : r.end]


def test_bytemap_says_when_a_range_is_missing():
    received = ByteMap()
    received.add(0, BLOB[:10])
    received.add(20, BLOB[20:30])
    assert received.extract(ByteRange(5, 10)) is None
    assert received.extract(ByteRange(20, 5)) == BLOB[20:25]
