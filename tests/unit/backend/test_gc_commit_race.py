"""gc v2 against commits in flight (guarantee 2: committed means restorable), with the real commit walk.

Each test injects a host's commit or presign at the exact step of gc's run where it races: after the mark
(a late manifest), inside the condemning window (gc's epoch is odd), between a walk and its transaction,
and around a pack's deletion.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.commit import CommitOutcome
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.gc import GarbageCollector
from sysbackup_backend.registry import PACK_CONDEMNED, PACK_DELETING
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from test_gc import GRACE, REAL_NOW, Collecting, Host, collector, pack_exists, restorable, state

ORPHAN = b"uploaded by a run that crashed, used again much later " * 30


def with_orphan(services: Services) -> tuple[Host, str]:
    """alpha committed once long ago and holds, in its local index, a pack no manifest uses: the next gc
    past the grace period condemns it."""
    alpha = Host(services, "alpha")
    alpha.backup({"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    orphan = alpha.upload([("data", ORPHAN)])
    assert orphan is not None
    return alpha, orphan


def ripe_orphan(services: Services) -> tuple[Host, str, GarbageCollector]:
    """The orphan of `with_orphan` condemned by one gc run, and a collector past the grace period (its run
    deletes the orphan)."""
    alpha, orphan = with_orphan(services)
    collector(services, REAL_NOW + 2 * GRACE).run()
    assert state(services, orphan) == PACK_CONDEMNED
    return alpha, orphan, collector(services, REAL_NOW + 4 * GRACE)


def inject_before(
    monkeypatch: pytest.MonkeyPatch, target: object, step: str, action: Callable[[], None], times: int = 1
) -> None:
    """Run `action` the first `times` times `target` is about to call its method `step`, then the step."""
    original = getattr(target, step)
    calls = [0]

    def racing(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] <= times:
            action()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, step, racing)


def test_a_commit_landing_after_the_mark_is_marked_inside_the_window(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha, orphan = with_orphan(backend)
    gc = collector(backend, REAL_NOW + 2 * GRACE)
    outcomes: list[CommitOutcome] = []
    # gc has marked (the orphan looked dead) and is about to open its window: the host commits it now.
    inject_before(
        monkeypatch,
        gc,
        "_open_condemning_window",
        lambda: outcomes.append(alpha.commit({"o": ORPHAN}, REAL_NOW)),
    )
    report = gc.run()
    assert [outcome.status_code for outcome in outcomes] == [201]
    assert report.packs_condemned == 0 and state(backend, orphan) != PACK_CONDEMNED
    head = str(backend.catalogue.head("alpha"))
    assert restorable(backend, "alpha", head)
    collector(backend, REAL_NOW + 4 * GRACE).run()  # the first manifest is forgotten: its packs go
    assert state(backend, orphan) != PACK_CONDEMNED and restorable(backend, "alpha", head)


def test_a_walk_gc_overtook_walks_again_is_refused_the_condemned_pack_and_succeeds_once_it_is_sent_again(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha, orphan = with_orphan(backend)
    host_committer = alpha.committer(REAL_NOW)
    reports = []
    # The walk has run (the orphan usable); gc runs whole before the commit's transaction.
    inject_before(
        monkeypatch,
        host_committer,
        "_commit",
        lambda: reports.append(collector(backend, REAL_NOW + 2 * GRACE).run()),
    )
    body = alpha.body({"o": ORPHAN})
    with pytest.raises(Unprocessable) as refused:
        host_committer.start("alpha", body, Budget(60))
    assert state(backend, orphan) == PACK_CONDEMNED and refused.value.details["packs"][orphan] == "condemned"
    # (gc's clock is two grace periods ahead of the registry's: the commit's fresh tree pack looked old too.)
    assert reports[0].packs_condemned == len(refused.value.details["packs"])
    # What the uploader does with the 422: drop the packs, send their blobs again (presign revives), commit.
    alpha.forget_refused(refused.value.details)
    assert alpha.commit({"o": ORPHAN}, REAL_NOW).status_code == 201
    head = str(backend.catalogue.head("alpha"))
    assert state(backend, orphan) != PACK_CONDEMNED and restorable(backend, "alpha", head)
    collector(backend, REAL_NOW + 4 * GRACE).run()
    assert state(backend, orphan) != PACK_CONDEMNED and restorable(backend, "alpha", head)


def test_a_walk_begun_inside_the_window_waits_for_it_to_close(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha = Host(backend, "alpha")
    alpha.backup({"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    gc = collector(backend, REAL_NOW + 2 * GRACE)
    deferred: list[CommitOutcome] = []
    inject_before(
        monkeypatch,
        gc,
        "_condemn_and_revive",
        lambda: deferred.append(alpha.commit({"n": b"new " * 9}, REAL_NOW)),
    )
    assert gc.run().complete
    assert deferred[0].status_code == 202
    done = alpha.committer(REAL_NOW).resume("alpha", str(deferred[0].body["job_id"]), Budget(60))
    assert done.status_code == 201 and restorable(backend, "alpha", str(done.body["manifest_id"]))


def test_a_presign_reviving_a_condemned_pack_before_its_deletion_keeps_it(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha, orphan, gc = ripe_orphan(backend)
    # gc judged the orphan ripe for deletion; the host presigns those very bytes again before it starts.
    del alpha.index[blob_hash(ORPHAN)]
    inject_before(monkeypatch, gc, "_delete_packs", lambda: alpha.upload([("data", ORPHAN)]) and None)
    report = gc.run()
    assert (
        report.packs_deleted == 0 and pack_exists(backend, orphan) and state(backend, orphan) == "presigned"
    )
    assert alpha.commit({"o": ORPHAN}, REAL_NOW).status_code == 201
    assert restorable(backend, "alpha", str(backend.catalogue.head("alpha")))


def test_a_presign_while_gc_deletes_the_pack_is_told_to_wait_then_uploads_afresh(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha, orphan, gc = ripe_orphan(backend)
    del alpha.index[blob_hash(ORPHAN)]  # the host presigns those very bytes again
    answers: list[str] = []

    def presign() -> None:
        try:
            alpha.upload([("data", ORPHAN)])
            answers.append("stored")
        except Collecting:
            answers.append("collecting")

    inject_before(monkeypatch, gc, "_delete_version", presign)
    report = gc.run()
    assert answers == ["collecting"] and report.deleted_packs == [orphan]
    assert state(backend, orphan) is None and not pack_exists(backend, orphan)
    # After the wait: a fresh item and upload of the same bytes; the commit goes through.
    assert alpha.commit({"o": ORPHAN}, REAL_NOW).status_code == 201
    assert restorable(backend, "alpha", str(backend.catalogue.head("alpha")))


def test_a_pack_being_deleted_is_refused_to_a_commit(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha, orphan, gc = ripe_orphan(backend)
    seen: list[str | None] = []
    outcomes: list[str] = []

    def commit_using_it() -> None:
        seen.append(state(backend, orphan))
        try:
            alpha.commit({"o": ORPHAN}, REAL_NOW)
            outcomes.append("committed")
        except Unprocessable as refused:
            outcomes.append(refused.details["packs"][orphan])

    inject_before(monkeypatch, gc, "_delete_version", commit_using_it)
    gc.run()
    assert seen == [PACK_DELETING] and outcomes == ["deleting"]


def test_a_host_added_to_a_pack_after_its_repack_keeps_the_old_pack(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    big, small = os.urandom(20_000), b"small and still needed " * 4
    alpha = Host(backend, "alpha")
    alpha.backup({"big": big, "small": small}, REAL_NOW - timedelta(days=41))
    alpha.backup({"small": small}, REAL_NOW - timedelta(days=40))
    old_pack = alpha.index[blob_hash(small)]
    gc = collector(backend, REAL_NOW + 2 * GRACE)
    # The new pack is written; beta presigns the old pack's bytes (it holds them too) before the window.
    inject_before(
        monkeypatch,
        gc,
        "_open_condemning_window",
        lambda: backend.registry.add_host(old_pack, "beta") and None,
    )
    report = gc.run()
    assert report.packs_repacked == 1 and report.errors == []
    assert state(backend, old_pack) != PACK_CONDEMNED  # the new pack does not serve beta
    assert restorable(backend, "alpha", str(backend.catalogue.head("alpha")))


def test_two_runs_at_once_one_does_nothing(backend: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    _, orphan = with_orphan(backend)
    first = collector(backend, REAL_NOW + 2 * GRACE)
    second: list[GarbageCollector] = [collector(backend, REAL_NOW + 2 * GRACE)]
    reports = []
    inject_before(monkeypatch, first, "_condemn_and_revive", lambda: reports.append(second[0].run()))
    assert first.run().packs_condemned == 1
    assert reports[0].skipped and not reports[0].complete and reports[0].packs_condemned == 0
    assert state(backend, orphan) == PACK_CONDEMNED
