"""The lock extender handler: the sample event runs, a malformed message is dropped, not retried."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_testkit import FakeLambdaContext, load_function

EVENTS = Path(__file__).resolve().parents[3] / "events"


@pytest.fixture
def extend_app(backend: Services) -> Any:
    return load_function("extend_retention")


def sqs_record(body: str, message_id: str = "m-1") -> dict[str, Any]:
    return {
        "messageId": message_id,
        "receiptHandle": "r",
        "body": body,
        "attributes": {},
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:s3-sysbackup-RetentionQueue-X",
        "awsRegion": "us-east-1",
    }


def test_sample_event_names_packs_this_stack_lacks_and_succeeds(extend_app: Any) -> None:
    event = json.loads((EVENTS / "extend_retention-lock-requested.json").read_text())
    assert extend_app.lambda_handler(event, FakeLambdaContext()) == {"batchItemFailures": []}


def test_a_malformed_message_is_dropped(extend_app: Any) -> None:
    event = {"Records": [sqs_record("not json"), sqs_record('{"packs": []}', "m-2")]}
    assert extend_app.lambda_handler(event, FakeLambdaContext()) == {"batchItemFailures": []}


def test_a_failure_to_reach_dynamodb_is_retried(extend_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*_: Any, **__: Any) -> Any:
        raise ConnectionError("DynamoDB is down")

    monkeypatch.setattr(extend_app.extender().registry, "get_many", unreachable)
    body = json.dumps({"packs": ["ab" * 32], "retain_until": "2030-01-01T00:00:00Z", "source": "gc"})
    event = {"Records": [sqs_record("not json"), sqs_record(body, "m-2")]}
    result = extend_app.lambda_handler(event, FakeLambdaContext())
    assert result == {"batchItemFailures": [{"itemIdentifier": "m-2"}]}
