"""Handler plumbing: the walk budget follows the Lambda's remaining time; bodies must be JSON."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from sysbackup_backend import api
from sysbackup_backend.errors import BadRequest
from sysbackup_testkit import FakeLambdaContext


def fake_app(context: Any = None, body: str | None = None) -> Any:
    return SimpleNamespace(lambda_context=context, current_event=SimpleNamespace(decoded_body=body))


@pytest.mark.parametrize(
    ("remaining_ms", "low", "high"),
    [
        (60_000, api.WALK_BUDGET_SECONDS - 1, api.WALK_BUDGET_SECONDS),
        (15_000, 15 - api.WALK_RESERVE_SECONDS - 1, 15 - api.WALK_RESERVE_SECONDS),
        (1_000, -0.1, 0.0),
    ],
)
def test_walk_budget_stays_inside_the_lambdas_time(remaining_ms: int, low: float, high: float) -> None:
    budget = api.walk_budget(fake_app(FakeLambdaContext(remaining_ms)))
    assert low <= budget.remaining_seconds() <= high


def test_json_body_refuses_empty_and_non_json() -> None:
    assert api.json_body(fake_app(body='{"a": [1]}')) == {"a": [1]}
    for body in (None, "", "{nope"):
        with pytest.raises(BadRequest):
            api.json_body(fake_app(body=body))


def test_services_wire_the_registry_and_the_commits_queues_from_the_environment(
    backend: api.Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert backend.registry.table_name == "blob-index"
    assert backend.committer.verify_queue is None  # a function without VERIFY_QUEUE_URL sends nothing
    monkeypatch.setenv("VERIFY_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com/123456789012/verify")
    monkeypatch.setenv("RETENTION_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com/123456789012/retention")
    api.services.cache_clear()
    wired = api.services()
    assert wired.committer.registry is wired.registry
    assert wired.committer.verify_queue is not None
    assert wired.committer.verify_queue.queue_url.endswith("/verify")
    assert wired.committer.retention_queue is not None
    assert wired.committer.retention_queue.queue_url.endswith("/retention")
