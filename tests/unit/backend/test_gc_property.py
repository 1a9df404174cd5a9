"""Property: however gc runs interleave with backups (committed at once, uploaded and committed later, or
committing at any point inside a gc run), gc never leaves a catalogued manifest reaching a blob that no pack
its host may use holds, every catalogued manifest stays restorable, and each host's newest stays catalogued.

A backup whose packs gc condemned while it was in flight is refused at commit (never committed broken); the
host drops them from its local index and uploads those blobs again (presign revives a condemned pack), as
the uploader does on a 422. A commit whose walk began before gc's condemning window fails its epoch check.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from moto import mock_aws
from sysbackup_backend import api
from sysbackup_backend.api import Services
from sysbackup_backend.commit import CommitOutcome
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.gc import GarbageCollector
from sysbackup_backend.walk import Budget
from sysbackup_domain.keep import GcPolicy, KeepRules
from sysbackup_domain.retention import RetentionPolicy
from sysbackup_testkit import ENV, _create_resources, _reset_caches
from test_gc import Collecting, Host, all_manifests, usable_for_every_kept_manifest

HOSTS = ("alpha", "beta")
# Small compressible files and one big incompressible one: a data pack holding it next to files that stay
# is mostly dead once it goes (gc repacks such packs).
CONTENTS = [f"file body number {n} ".encode() * (20 + n) for n in range(5)] + [
    random.Random(5).randbytes(20_000)
]
GRACE = timedelta(minutes=30)
# Manifests lock for a minute of simulated time: gc may forget them after the next step.
POLICY = RetentionPolicy(days_retained=1, max_days_retained=10, lock_mode="GOVERNANCE", retention_seconds=60)
KEEP = KeepRules(last=1, daily=0, weekly=0, monthly=0, yearly=0, minimum=1)
# gc steps a commit can land at: before the run, after its mark (a late manifest), inside its condemning
# window (refused by the epoch check), after the window (before the deletions).
GC_STEPS = ("_open_condemning_window", "_condemn_and_revive", "_delete_packs")


class World:
    """Hosts, their backups in flight and the simulated clock (each step an hour: manifests lock for a
    minute and the grace period is half an hour, so gc may forget and condemn at every run)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.hosts = {name: Host(services, name, policy=POLICY) for name in HOSTS}
        self.in_flight: dict[str, dict[str, bytes]] = {}
        self.jobs: dict[str, str] = {}  # host -> its commit job waiting for gc's window to close
        self.newest: dict[str, str] = {}
        self.now = datetime.now(timezone.utc)

    def start(self, host: str, picked: list[int]) -> None:
        """Upload a backup's blobs; its commit comes later."""
        files = self.in_flight.setdefault(host, {f"f{n}": CONTENTS[n] for n in picked})
        with suppress(Collecting):  # gc is deleting that very pack: the uploader sends it again later
            self.hosts[host].body(files)

    def commit(self, host: str, gc_between_walk_and_transaction: bool = False) -> None:
        """Commit the backup in flight, if any (once: refused packs are dropped for the next try)."""
        files = self.in_flight.get(host)
        if files is None:
            return
        committer = self.hosts[host].committer(self.now)
        if gc_between_walk_and_transaction:
            interleave(committer, "_commit", lambda: self.gc(None, GC_STEPS[0]))
        try:
            outcome = committer.start(host, self.hosts[host].body(files), Budget(60))
        except Unprocessable as refused:
            event("a commit was refused a pack gc condemned or is deleting")
            self.hosts[host].forget_refused(refused.details)
            return
        except Collecting:
            return
        self._finished(host, outcome)

    def resume(self, host: str) -> None:
        """A commit job that waited for gc's window to close goes on."""
        if host in self.jobs:
            committer = self.hosts[host].committer(self.now)
            try:
                outcome = committer.resume(host, self.jobs.pop(host), Budget(60))
            except Unprocessable as refused:
                self.hosts[host].forget_refused(refused.details)
                return
            self._finished(host, outcome)

    def _finished(self, host: str, outcome: CommitOutcome) -> None:
        if outcome.status_code == 202:
            event("a commit waited for gc's window")
            self.jobs[host] = str(outcome.body["job_id"])
        elif outcome.status_code == 201:
            self.newest[host] = str(outcome.body["manifest_id"])
            del self.in_flight[host]
        else:
            self.hosts[host].forget_refused(outcome.body)

    def finish(self, host: str) -> None:
        """Commit until it goes through, re-sending refused blobs as the uploader does."""
        for _ in range(4):
            self.resume(host)
            if host not in self.in_flight:
                return
            self.start(host, [])
            self.commit(host)
        assert host not in self.in_flight, f"{host}'s commit did not go through"

    def gc(self, host: str | None, step: str) -> None:
        """A gc run; `host`'s backup in flight commits at `step` of it."""
        policy = GcPolicy(keep=KEEP, grace=GRACE, fold_window=timedelta(0))
        collector = GarbageCollector(
            self.services.registry, self.services.store, self.services.catalogue,
            self.services.settings.jobs_table, policy, "GOVERNANCE", None, clock=lambda at=self.now: at,
        )  # fmt: skip
        if host is not None:
            interleave(collector, step, lambda: self.commit(host))
        report = collector.run()
        assert report.complete or report.skipped
        for name in ("packs_condemned", "packs_revived", "packs_deleted", "packs_repacked"):
            if getattr(report, name):
                event(f"gc: {name}")


def interleave(target: object, step: str, action: Callable[[], None]) -> None:
    """Run `action` once, when `target` is first about to call its method `step`."""
    original = getattr(target, step)

    def racing(*args: object, **kwargs: object) -> object:
        setattr(target, step, original)
        action()
        return original(*args, **kwargs)

    setattr(target, step, racing)


@contextmanager
def fresh_backend() -> Iterator[Services]:
    _reset_caches()
    with mock_aws():
        _create_resources()
        yield api.services()
    _reset_caches()


files = st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)
operation = st.one_of(
    st.tuples(st.just("backup"), st.sampled_from(HOSTS), files),
    st.tuples(st.just("start"), st.sampled_from(HOSTS), files),
    st.tuples(st.just("race"), st.sampled_from(HOSTS), files),
    st.tuples(st.just("finish"), st.sampled_from(HOSTS), st.just(GC_STEPS[0])),
    st.tuples(st.just("gc"), st.sampled_from(HOSTS), st.tuples(files, st.sampled_from(GC_STEPS))),
)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The functions' environment; each example starts its own empty moto world."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(operation, min_size=2, max_size=9))
def test_gc_interleaved_with_commits_never_breaks_a_manifest(
    aws_env: None, operations: list[tuple[str, str, object]]
) -> None:
    with fresh_backend() as services:
        world = World(services)
        for kind, host, argument in operations:
            world.now += timedelta(hours=1)
            if kind in ("backup", "start", "race"):
                world.start(host, argument)  # type: ignore[arg-type]
            if kind == "backup":
                world.finish(host)
            elif kind == "race":
                world.commit(host, gc_between_walk_and_transaction=True)
            elif kind == "finish":
                world.finish(host)
            elif kind == "gc":
                picked, step = argument  # type: ignore[misc]
                world.start(host, picked)
                world.gc(host, step)
            for name, manifest_id in world.newest.items():
                assert services.catalogue.head(name) == manifest_id
            assert usable_for_every_kept_manifest(services), (kind, host, argument)
        # In the end every backup in flight commits and, after one more gc, all is still restorable.
        for name in HOSTS:
            world.finish(name)
        world.now += timedelta(hours=1)
        world.gc(None, GC_STEPS[0])
        assert usable_for_every_kept_manifest(services)
        assert {summary.host for summary in all_manifests(services)} == set(world.newest)
