"""Ranged reads: nearby blobs of a pack share one GET, far or huge ones do not."""

from __future__ import annotations

from s3_sysbackup.fetch import MAX_RANGE_BYTES, MERGE_GAP_BYTES, plan_spans
from sysbackup_domain.packs import PackEntry


def entry(n: int, offset: int, length: int) -> PackEntry:
    return PackEntry(f"{n:064x}", "data", "none", offset, length, length)


def test_adjacent_and_near_blobs_merge_far_ones_do_not():
    near = [entry(1, 0, 100), entry(2, 100, 50), entry(3, 150 + MERGE_GAP_BYTES, 10)]
    far = entry(4, 160 + 2 * MERGE_GAP_BYTES + 1, 10)
    spans = plan_spans("p", [far, *reversed(near)])  # any order in, offset order out
    assert [(s.start, s.end) for s in spans] == [(0, 160 + MERGE_GAP_BYTES), (far.offset, far.offset + 10)]
    assert [e.hash for e in spans[0].entries] == [e.hash for e in near]


def test_a_span_never_grows_past_the_range_limit():
    big = MAX_RANGE_BYTES // 2 + 1
    spans = plan_spans("p", [entry(1, 0, big), entry(2, big, big), entry(3, 2 * big, 10)])
    assert len(spans) == 2
    assert all(s.end - s.start <= MAX_RANGE_BYTES for s in spans)
    assert sum(len(s.entries) for s in spans) == 3
