"""Property: however gc runs interleave with backups (committed, or uploaded and committed later), every
catalogued manifest stays restorable, and each host's newest manifest stays catalogued.

A backup whose blobs gc condemned while it was in flight is refused at commit (never committed broken);
the host then uploads those blobs again, as the uploader does, and the commit succeeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moto import mock_aws
from sysbackup_backend import api
from sysbackup_backend.api import Services
from sysbackup_backend.commit import Committer
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.gc import GarbageCollector
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.keep import GcPolicy, KeepRules
from sysbackup_domain.retention import RetentionPolicy
from sysbackup_testkit import ENV, _create_resources, _reset_caches, file_entry, tree_bytes
from test_gc import restorable, upload

HOSTS = ("alpha", "beta")
CONTENTS = [f"file body number {n} ".encode() * (20 + n) for n in range(6)]
GRACE = timedelta(minutes=30)
# Manifests lock for a minute of simulated time: gc may forget them after the next step.
POLICY = RetentionPolicy(days_retained=1, max_days_retained=10, lock_mode="GOVERNANCE", retention_seconds=60)
KEEP = KeepRules(last=1, daily=0, weekly=0, monthly=0, yearly=0, minimum=1)


@dataclass
class Pending:
    host: str
    files: dict[str, bytes]
    root: bytes


def start_backup(services: Services, host: str, picked: list[int]) -> Pending:
    files = {f"f{n}": CONTENTS[n] for n in picked}
    root = tree_bytes([file_entry(name, [blob_hash(body)]) for name, body in files.items()])
    upload(services, host, [("data", body) for body in files.values()])
    upload(services, host, [("tree", root)])
    return Pending(host, files, root)


def finish_backup(services: Services, pending: Pending, now: datetime) -> str:
    committer = Committer(
        services.index, services.store, services.catalogue, services.jobs, POLICY, clock=lambda: now
    )
    body = {"parent": services.catalogue.head(pending.host), "root": blob_hash(pending.root), "snapshots": []}
    by_hash = {blob_hash(b): ("data", b) for b in pending.files.values()} | {
        blob_hash(pending.root): ("tree", pending.root)
    }
    # What the uploader does with a refusal: send what was condemned (or collected) again, commit again.
    # A condemned tree hides its children's state, so this may take one round per tree level.
    for _ in range(3):
        try:
            outcome = committer.start(pending.host, body, Budget(60))
        except Unprocessable as refused:
            lost = set(refused.details["condemned"]) | set(refused.details["missing"])
            assert lost and not refused.details["corrupt"], refused.details
            upload(services, pending.host, [by_hash[blob] for blob in sorted(lost)])
            continue
        assert outcome.status_code == 201, outcome.body
        return str(outcome.body["manifest_id"])
    raise AssertionError("the commit was still refused after sending everything again")


@contextmanager
def fresh_backend() -> Iterator[Services]:
    _reset_caches()
    with mock_aws():
        _create_resources()
        yield api.services()
    _reset_caches()


operation = st.one_of(
    st.tuples(
        st.just("backup"),
        st.sampled_from(HOSTS),
        st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True),
    ),
    st.tuples(
        st.just("start"),
        st.sampled_from(HOSTS),
        st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True),
    ),
    st.tuples(st.just("finish"), st.sampled_from(HOSTS), st.just([])),
    st.tuples(st.just("gc"), st.sampled_from(HOSTS), st.just([])),
)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The functions' environment; each example starts its own empty moto world."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(operation, min_size=2, max_size=10))
def test_gc_interleaved_with_backups_never_breaks_a_manifest(
    aws_env: None, operations: list[tuple[str, str, list[int]]]
) -> None:
    with fresh_backend() as services:
        now = datetime.now(timezone.utc)
        pending: dict[str, Pending] = {}
        newest: dict[str, str] = {}
        for kind, host, picked in operations:
            # Each step is a simulated hour: locks of a minute lapse, a grace period of 30 minutes passes.
            now += timedelta(hours=1)
            if kind == "backup":
                newest[host] = finish_backup(services, start_backup(services, host, picked), now)
            elif kind == "start" and host not in pending:
                pending[host] = start_backup(services, host, picked)
            elif kind == "finish" and host in pending:
                newest[host] = finish_backup(services, pending.pop(host), now)
            elif kind == "gc":
                policy = GcPolicy(keep=KEEP, grace=GRACE, fold_window=timedelta(0))
                collector = GarbageCollector(
                    services.index, services.store, services.catalogue, services.settings.jobs_table,
                    policy, "GOVERNANCE", None, clock=lambda at=now: at,
                )  # fmt: skip
                assert collector.run().complete
            for name, manifest_id in newest.items():
                assert services.catalogue.head(name) == manifest_id
                assert services.catalogue.get(name, manifest_id) is not None
            for name in HOSTS:
                for summary in services.catalogue.list(name):
                    assert restorable(services, name, summary.manifest_id), (kind, name, summary.manifest_id)
