"""The gc handler: its sample events run, a dry run writes nothing, a malformed dry_run is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_testkit import FakeLambdaContext, load_function, store_pack

EVENTS = Path(__file__).resolve().parents[3] / "events"


@pytest.fixture
def gc_app(backend: Services, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GRACE_PERIOD_SECONDS", "0")
    return load_function("gc")


@pytest.mark.parametrize("name", ["gc-scheduled.json", "gc-try-dry-run.json"])
def test_sample_events_run_a_complete_collection(gc_app: Any, name: str) -> None:
    report = gc_app.lambda_handler(json.loads((EVENTS / name).read_text()), FakeLambdaContext(900_000))
    assert report["complete"] and report["errors"] == []
    assert report["dry_run"] is (name == "gc-try-dry-run.json")
    json.dumps(report)  # what Lambda must be able to return


def test_a_dry_run_takes_no_lease(gc_app: Any, backend: Services) -> None:
    gc_app.lambda_handler({"dry_run": True}, FakeLambdaContext(900_000))
    assert backend.jobs.client.scan(TableName=backend.settings.jobs_table)["Items"] == []


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_dry_run_flag_that_is_not_a_boolean_is_refused(gc_app: Any, value: object) -> None:
    with pytest.raises(ValueError, match="dry_run"):
        gc_app.lambda_handler({"dry_run": value}, FakeLambdaContext(900_000))


def test_settings_are_read_from_the_template_parameters(gc_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEP_DAILY", "14")
    monkeypatch.setenv("GC_BYPASS_GOVERNANCE", "true")
    gc_app.collector.cache_clear()
    policy = gc_app.collector().policy
    assert policy.keep.daily == 14 and policy.bypass_governance and policy.grace.total_seconds() == 0


def test_the_handler_collects_through_the_registry(gc_app: Any, backend: Services) -> None:
    """An orphan pack (no manifest uses it; grace 0) is condemned by one run and deleted by the next."""
    orphan = store_pack(backend, "alpha", [("data", b"a crashed run's upload " * 9)])
    first = gc_app.lambda_handler({}, FakeLambdaContext(900_000))
    record = backend.registry.get(orphan.pack_id)
    assert first["packs_condemned"] == 1 and record is not None and record.state == "condemned"
    second = gc_app.lambda_handler({}, FakeLambdaContext(900_000))
    assert second["deleted_packs"] == [orphan.pack_id] and second["bytes_freed"] == len(orphan.data)
    assert backend.registry.get(orphan.pack_id) is None
