"""Job persistence (large frontiers, racing polls) and the walk's building blocks."""

from __future__ import annotations

import os

from sysbackup_backend.api import Services
from sysbackup_backend.jobs import JOB_FAILED
from sysbackup_backend.walk import (
    MAX_RANGE_GAP_BYTES,
    STREAM,
    TREE,
    BlobPlace,
    Budget,
    WalkState,
    coalesce_ranges,
    read_stored_blobs,
)
from sysbackup_domain.packs import PackEntry


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
    state = WalkState.start([("a" * 64, "e" * 64, TREE), ("b" * 64, None, STREAM), ("b" * 64, None, STREAM)])
    state.missing.append("c" * 64)
    state.invalid["d" * 64] = "bad"
    state.refused_packs["f" * 64] = "corrupt"
    state.packs.append("f" * 64)
    state.gc_epoch = 4
    again = WalkState.from_bytes(state.to_bytes())
    assert again == state
    # Visited from the end: the first pair first, a repeated pair once.
    assert again.stack == [["b" * 64, None, STREAM], ["a" * 64, "e" * 64, TREE]]


def _entry(offset: int, length: int) -> PackEntry:
    return PackEntry(
        hash="a" * 64, kind="tree", codec="none", offset=offset, length=length, raw_length=length
    )


def test_coalesce_merges_near_blobs_and_splits_far_ones() -> None:
    far = 10 + MAX_RANGE_GAP_BYTES + 100
    ranges = coalesce_ranges([_entry(far, 5), _entry(0, 10), _entry(12, 3)])
    assert ranges == [(0, 15), (far, far + 5)]


def test_read_stored_blobs_serves_held_packs_without_a_get() -> None:
    class NoStore:
        def read_range(self, key: str, start: int, end: int) -> bytes:
            raise AssertionError(f"read {key}")

    body = b"0123456789abcdefghij"
    places = {"one": BlobPlace("p", _entry(2, 3)), "two": BlobPlace("p", _entry(15, 5))}
    found = {blob: bytes(view or b"") for blob, _, view in read_stored_blobs(NoStore(), places, {"p": body})}  # type: ignore[arg-type]
    assert found == {"one": b"234", "two": b"fghij"}


def test_budget_expires() -> None:
    ticks = iter([0.0, 0.5, 2.0])
    budget = Budget(1.0, clock=lambda: next(ticks))
    assert not budget.expired()
    assert budget.expired()
