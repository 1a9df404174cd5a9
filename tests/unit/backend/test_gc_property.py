"""Property: however gc runs interleave with backups (committed at once, uploaded and committed later, or
committing at any point inside a gc run), gc never leaves a catalogued manifest reaching a blob that no pack
its host may use holds, every catalogued manifest stays restorable, and each host's newest stays catalogued.

A backup whose packs gc condemned while it was in flight is refused at commit (never committed broken); the
host drops them from its local index and uploads those blobs again (presign revives a condemned pack), as
the uploader does on a 422. A commit whose walk began before gc's condemning window fails its epoch check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from moto import mock_aws
from sysbackup_backend import api
from sysbackup_backend.api import Services
from sysbackup_backend.catalogue import TransactionRefused
from sysbackup_backend.gc import GarbageCollector
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.keep import GcPolicy, KeepRules
from sysbackup_testkit import ENV, _create_resources, _reset_caches, file_entry, tree_bytes
from test_gc import Collecting, Host, PendingCommit, Refused, all_manifests, usable_for_every_kept_manifest

HOSTS = ("alpha", "beta")
CONTENTS = [f"file body number {n} ".encode() * (20 + n) for n in range(6)]
GRACE = timedelta(minutes=30)
KEEP = KeepRules(last=1, daily=0, weekly=0, monthly=0, yearly=0, minimum=1)
# gc steps a commit can land at: before the run, after its mark (a late manifest), inside its condemning
# window (refused by the epoch check), after the window (before the deletions).
GC_STEPS = ("_open_condemning_window", "_condemn_and_revive", "_delete_packs")


@dataclass
class Backup:
    """A host's backup in flight: its files uploaded, its walk perhaps run."""

    host: Host
    files: dict[str, bytes]
    walked: PendingCommit | None = None

    @property
    def root(self) -> bytes:
        return tree_bytes([file_entry(name, [blob_hash(body)]) for name, body in self.files.items()])


class World:
    """Hosts, their backups in flight and the simulated clock (each step an hour: manifests lock for a
    minute and the grace period is half an hour, so gc may forget and condemn at every run)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.hosts = {name: Host(services, name) for name in HOSTS}
        self.in_flight: dict[str, Backup] = {}
        self.newest: dict[str, str] = {}
        self.now = datetime.now(timezone.utc)

    def start(self, host: str, picked: list[int]) -> None:
        if host not in self.in_flight:
            backup = Backup(self.hosts[host], {f"f{n}": CONTENTS[n] for n in picked})
            self._upload(backup)
            self.in_flight[host] = backup

    def walk(self, host: str) -> None:
        backup = self.in_flight.get(host)
        if backup is not None and backup.walked is None:
            try:
                backup.walked = backup.host.walk(backup.root, backup.files.values())
            except (Refused, Collecting):
                event("a commit was refused a pack gc condemned or is deleting")  # walked again at `finish`

    def land(self, host: str) -> bool:
        """The walked commit's transaction, if there is one; False if refused (the epoch moved)."""
        backup = self.in_flight.get(host)
        if backup is None or backup.walked is None:
            return False
        try:
            manifest_id = backup.host.land(backup.walked, self.now, self.now + timedelta(minutes=1))
        except TransactionRefused:
            event("a commit failed its epoch check")
            backup.walked = None  # walked before gc condemned: walk again
            return False
        self.newest[host] = manifest_id
        del self.in_flight[host]
        return True

    def finish(self, host: str) -> None:
        """Commit the backup in flight, walking again and re-sending refused packs as the uploader does."""
        for _ in range(4):
            if host not in self.in_flight:
                return
            self.walk(host)
            if not self.land(host):
                self._upload(self.in_flight[host])
        raise AssertionError(f"{host}'s commit did not go through")

    def _upload(self, backup: Backup) -> None:
        blobs = [("data", body) for body in backup.files.values()]
        try:
            backup.host.upload(blobs)
            backup.host.upload([("tree", backup.root)])
        except Collecting:
            pass  # gc is deleting that very pack: the uploader waits and sends it again later

    def gc(self, interleave: Callable[[], None] | None, step: str) -> None:
        policy = GcPolicy(keep=KEEP, grace=GRACE, fold_window=timedelta(0))
        collector = GarbageCollector(
            self.services.registry, self.services.store, self.services.catalogue,
            self.services.settings.jobs_table, policy, "GOVERNANCE", None, clock=lambda at=self.now: at,
        )  # fmt: skip
        if interleave is not None:
            original = getattr(collector, step)

            def racing(*args: object, **kwargs: object) -> object:
                interleave()
                return original(*args, **kwargs)

            setattr(collector, step, racing)
        report = collector.run()
        assert report.complete
        for name in ("packs_condemned", "packs_revived", "packs_deleted", "packs_repacked"):
            if getattr(report, name):
                event(f"gc: {name}")


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
    st.tuples(st.just("walk"), st.sampled_from(HOSTS), files),
    st.tuples(st.just("finish"), st.sampled_from(HOSTS), st.just(GC_STEPS[0])),
    st.tuples(st.just("gc"), st.sampled_from(HOSTS), st.sampled_from(GC_STEPS)),
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
            if kind == "backup":
                world.start(host, argument)  # type: ignore[arg-type]
                world.finish(host)
            elif kind == "start":
                world.start(host, argument)  # type: ignore[arg-type]
            elif kind == "walk":
                world.start(host, argument)  # type: ignore[arg-type]
                world.walk(host)
            elif kind == "finish":
                world.finish(host)
            else:
                # The host's walked commit (if any) lands at the chosen step of gc's run.
                world.gc(lambda h=host: world.land(h) and None, str(argument))
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
