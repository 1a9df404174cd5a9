"""Job persistence (large frontiers, racing polls) and the walk's building blocks."""

from __future__ import annotations

import os

from sysbackup_backend.api import Services
from sysbackup_backend.index import BlobLocation
from sysbackup_backend.jobs import JOB_FAILED
from sysbackup_backend.walk import MAX_RANGE_GAP_BYTES, Budget, WalkState, coalesce_ranges


def test_large_progress_is_split_and_read_back(backend: Services) -> None:
    progress = os.urandom(700 * 1024)  # incompressible: needs three parts
    job = backend.jobs.create("commit", "alpha", {"parent": None}, progress)
    loaded = backend.jobs.load(job.job_id)
    assert loaded is not None
    assert (loaded.progress, loaded.host, loaded.request) == (progress, "alpha", {"parent": None})


def test_a_large_request_is_stored_in_parts(backend: Services) -> None:
    request = {"warnings": [os.urandom(2000).hex() for _ in range(300)]}  # about 1.2 MB of JSON
    job = backend.jobs.create("commit", "alpha", request, b"p")
    loaded = backend.jobs.load(job.job_id)
    assert loaded is not None and loaded.request == request


def test_a_stale_poll_cannot_overwrite_newer_progress(backend: Services) -> None:
    job = backend.jobs.create("commit", "alpha", {}, b"v0")
    assert backend.jobs.save_progress(job, b"v1")
    assert not backend.jobs.save_progress(job, b"stale")  # still holds version 0
    assert not backend.jobs.finish(job, JOB_FAILED, {"status": 422, "body": {}})
    loaded = backend.jobs.load(job.job_id)
    assert loaded is not None and loaded.progress == b"v1"


def test_part_items_are_not_jobs(backend: Services) -> None:
    job = backend.jobs.create("commit", "alpha", {}, b"x")
    assert backend.jobs.load(f"{job.job_id}#x#0") is None


def test_walk_state_round_trips() -> None:
    state = WalkState.start("a" * 64, ["b" * 64, "b" * 64])
    state.open["c" * 64] = [2, [None, "a" * 64]]
    state.corrupt["d" * 64] = "bad"
    again = WalkState.from_bytes(state.to_bytes())
    assert again == state
    assert [entry[0] for entry in again.stack] == ["b" * 64, "a" * 64]


def _location(offset: int, length: int) -> BlobLocation:
    return BlobLocation(
        pack_id="p", offset=offset, length=length, raw_length=length, codec="none", kind="tree", verified=True
    )


def test_coalesce_merges_near_blobs_and_splits_far_ones() -> None:
    far = 10 + MAX_RANGE_GAP_BYTES + 100
    ranges = coalesce_ranges([_location(far, 5), _location(0, 10), _location(12, 3)])
    assert ranges == [(0, 15), (far, far + 5)]


def test_budget_expires() -> None:
    ticks = iter([0.0, 0.5, 2.0])
    budget = Budget(1.0, clock=lambda: next(ticks))
    assert not budget.expired()
    assert budget.expired()
