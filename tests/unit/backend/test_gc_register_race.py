"""gc deleting a pack against registrations in flight (issue 6, guarantee 2: committed means restorable).

gc's steps and a host's `register_pack` are interleaved deterministically: the host's call is injected at the
exact point of gc's run where it races (the host's PUT answered 412 because the object was still there).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.commit import Committer
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.gc import GarbageCollector
from sysbackup_backend.index import PACK_DELETING, PACK_SK, PackCollecting, pack_pk
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import PackEntry, parse_trailer
from sysbackup_testkit import file_entry, tree_bytes
from test_gc import GRACE, POLICY, REAL_NOW, backup, collector, pack_exists, restorable, upload

ORPHAN_CONTENT = b"uploaded by a run that crashed, sent again much later " * 30


def condemned_orphan(services: Services) -> tuple[str, list[PackEntry]]:
    """A committed backup, plus a pack no manifest uses, condemned by one gc run: the next run deletes it."""
    backup(services, "alpha", {"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    orphan = upload(services, "alpha", [("data", ORPHAN_CONTENT)])
    assert collector(services, REAL_NOW + 2 * GRACE).run().blobs_condemned == 1
    return orphan, parse_trailer(services.store.read(f"packs/{orphan}"))


def try_register(services: Services, host: str, pack_id: str, entries: list[PackEntry]) -> str:
    try:
        services.index.register_pack(host, pack_id, entries)
    except PackCollecting:
        return "refused"
    return "registered"


def inject_before(
    monkeypatch: pytest.MonkeyPatch, gc: GarbageCollector, step: str, action: Callable[[], None]
) -> None:
    """Run `action` each time gc is about to call its method `step`, then the step itself."""
    original = getattr(gc, step)

    def racing(*args: object, **kwargs: object) -> object:
        action()
        return original(*args, **kwargs)

    monkeypatch.setattr(gc, step, racing)


def commit_tree_over(services: Services, host: str, content: bytes) -> None:
    """The host's commit of a tree naming `content` (the tree itself uploaded fresh)."""
    root = tree_bytes([file_entry("again", [blob_hash(content)])])
    upload(services, host, [("tree", root)])
    committer = Committer(services.index, services.store, services.catalogue, services.jobs, POLICY)
    body = {"parent": services.catalogue.head(host), "root": blob_hash(root), "snapshots": [], "stats": {}}
    outcome = committer.start(host, body, Budget(60))
    assert outcome.status_code == 201, outcome.body


def test_a_registration_between_the_last_check_and_the_deletion_is_refused(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan, entries = condemned_orphan(backend)
    gc = collector(backend, REAL_NOW + 4 * GRACE)
    outcomes: list[str] = []
    # gc re-read the pack's items (all condemned) and is about to delete its versions: the host registers.
    inject_before(
        monkeypatch,
        gc,
        "_delete_versions",
        lambda: outcomes.append(try_register(backend, "beta", orphan, entries)),
    )
    report = gc.run()

    assert report.deleted_packs == [orphan] and not pack_exists(backend, orphan)
    assert outcomes == ["refused"]
    # No claim is left on the deleted pack: the dedup check asks for the blob again, and a commit naming
    # it is refused until it is sent again.
    assert not backend.index.stored_for("beta", [blob_hash(ORPHAN_CONTENT)])
    with pytest.raises(Unprocessable) as refused:
        commit_tree_over(backend, "beta", ORPHAN_CONTENT)
    assert refused.value.details["missing"] == [blob_hash(ORPHAN_CONTENT)]


def test_a_registration_after_the_scan_keeps_the_pack_for_the_manifest_that_follows(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan, entries = condemned_orphan(backend)
    gc = collector(backend, REAL_NOW + 4 * GRACE)
    outcomes: list[str] = []
    # A second host's claim lands after gc scanned the index (its scan never saw a `host#beta` item).
    inject_before(
        monkeypatch,
        gc,
        "_delete_dead_packs",
        lambda: outcomes.append(try_register(backend, "beta", orphan, entries)),
    )
    report = gc.run()

    assert outcomes == ["registered"]
    assert report.packs_deleted == 0 and pack_exists(backend, orphan)
    assert backend.index.get_pack(orphan)["state"] != PACK_DELETING  # type: ignore[index]
    commit_tree_over(backend, "beta", ORPHAN_CONTENT)
    assert restorable(backend, "beta", str(backend.catalogue.head("beta")))


def test_claims_on_a_pack_being_deleted_are_not_stored(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between `deleting` and the pack item's removal, dedup never answers a claim on the pack."""
    orphan, _ = condemned_orphan(backend)
    gc = collector(backend, REAL_NOW + 4 * GRACE)
    seen: list[tuple[str, bool]] = []
    inject_before(
        monkeypatch,
        gc,
        "_delete_versions",
        lambda: seen.append(
            (
                backend.index.get_pack(orphan)["state"],  # type: ignore[index]
                bool(backend.index.stored_for("alpha", [blob_hash(ORPHAN_CONTENT)])),
            )
        ),
    )
    gc.run()
    assert seen == [(PACK_DELETING, False)]


def test_a_dead_pack_still_locked_goes_back_to_its_state(backend: Services) -> None:
    backup(backend, "alpha", {"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    locked = upload(backend, "alpha", [("data", ORPHAN_CONTENT)], lock_until=REAL_NOW + timedelta(days=3))
    state = backend.index.get_pack(locked)["state"]  # type: ignore[index]
    collector(backend, REAL_NOW + 2 * GRACE).run()
    waiting = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert waiting.packs_waiting_for_lock == 1 and pack_exists(backend, locked)
    assert backend.index.get_pack(locked)["state"] == state  # type: ignore[index]
    # and it is deleted once gc may bypass the lock
    assert collector(backend, REAL_NOW + 4 * GRACE, bypass=True).run().deleted_packs == [locked]


def crash_while_deleting(services: Services, pack_id: str) -> None:
    """What a gc run that crashed between `_begin_deleting` and the pack's removal leaves behind."""
    services.index.client.update_item(
        TableName=services.index.table_name,
        Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
        UpdateExpression="SET state_before_deleting = #state, #state = :deleting",
        ExpressionAttributeNames={"#state": "state"},
        ExpressionAttributeValues={":deleting": PACK_DELETING},
    )


def test_a_crashed_runs_deletion_is_finished_or_released_by_the_next_run(backend: Services) -> None:
    orphan, _ = condemned_orphan(backend)
    not_dead = upload(backend, "alpha", [("data", b"condemned by the next run at the earliest " * 10)])
    state = backend.index.get_pack(not_dead)["state"]  # type: ignore[index]
    crash_while_deleting(backend, orphan)
    crash_while_deleting(backend, not_dead)

    report = collector(backend, REAL_NOW + 4 * GRACE).run()

    assert report.deleted_packs == [orphan] and not pack_exists(backend, orphan)
    assert backend.index.get_pack(not_dead)["state"] == state  # type: ignore[index]
    assert (
        try_register(backend, "alpha", not_dead, parse_trailer(backend.store.read(f"packs/{not_dead}")))
        == "registered"
    )
