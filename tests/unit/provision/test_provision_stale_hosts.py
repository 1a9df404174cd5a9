"""functions/stale_hosts against moto: hosts from the IAM group, heads from the ManifestTable, the report
delivered through the SNS topic to an SQS subscriber, so the test reads what an admin would receive."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from provision_testkit import REGION
from sysbackup_backend import clients, settings

REPO_ROOT = Path(__file__).resolve().parents[3]
MANIFEST_TABLE = "manifests-table"
GROUP = "pkg-hosts"
SAMPLE_EVENT = REPO_ROOT / "events" / "stale_hosts-daily-check.json"


class FakeContext:
    function_name = "stale_hosts"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:stale_hosts"
    aws_request_id = "test-request"


@dataclass
class Stack:
    function: ModuleType
    queue_url: str

    def messages(self) -> list[str]:
        """Bodies the admin's subscriber got (raw delivery: the message text itself)."""
        received = boto3.client("sqs").receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10)
        return [message["Body"] for message in received.get("Messages", [])]


def load_function() -> ModuleType:
    path = REPO_ROOT / "functions" / "stale_hosts" / "app.py"
    spec = importlib.util.spec_from_file_location("function_stale_hosts_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first, as a normal import would be: its dataclasses look their module up.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stack(aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """The stack's pieces the check touches, and the env the template gives the function."""
    topic_arn = boto3.client("sns").create_topic(Name="alarms")["TopicArn"]
    sqs = boto3.client("sqs")
    queue_url = sqs.create_queue(QueueName="admin-inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    boto3.client("sns").subscribe(
        TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"}
    )
    boto3.client("dynamodb").create_table(
        TableName=MANIFEST_TABLE,
        KeySchema=[
            {"AttributeName": "host", "KeyType": "HASH"},
            {"AttributeName": "manifest_id", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "host", "AttributeType": "S"},
            {"AttributeName": "manifest_id", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    boto3.client("iam").create_group(GroupName=GROUP)
    env = {
        "AWS_REGION": REGION,
        "BUCKET_NAME": "bucket",
        "BLOB_INDEX_TABLE": "blob-index",
        "MANIFEST_TABLE": MANIFEST_TABLE,
        "JOBS_TABLE": "jobs",
        "POWERTOOLS_SERVICE_NAME": "stale_hosts",
        "POWERTOOLS_METRICS_NAMESPACE": "s3-sysbackup-test",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "ALARM_TOPIC_ARN": topic_arn,
        "HOSTS_GROUP": GROUP,
        "STALE_AFTER_HOURS": "48",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings.get_settings.cache_clear()
    clients.reset_clients()
    yield Stack(load_function(), queue_url)
    settings.get_settings.cache_clear()
    clients.reset_clients()


def add_host(name: str, last_backup: datetime | None) -> None:
    iam = boto3.client("iam")
    iam.create_user(UserName=name, Path="/pkg/hosts/")
    iam.add_user_to_group(GroupName=GROUP, UserName=name)
    if last_backup is not None:
        boto3.resource("dynamodb").Table(MANIFEST_TABLE).put_item(
            Item={"host": name, "manifest_id": "HEAD", "current": f"{last_backup:%Y%m%dT%H%M%SZ}-0a1b2c3d"}
        )


def scheduled_event(at: datetime) -> dict[str, Any]:
    event = json.loads(SAMPLE_EVENT.read_text())
    event["time"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return event


def invoke(stack: Stack, at: datetime) -> dict[str, Any]:
    return stack.function.lambda_handler(scheduled_event(at), FakeContext())


def test_reports_hosts_past_the_limit_in_one_message_oldest_first(stack: Stack) -> None:
    # Users are created "now"; the check runs as of a later date so they are old enough to be judged.
    checked_at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=30)
    add_host("fresh", checked_at - timedelta(hours=20))
    add_host("stale", checked_at - timedelta(days=3))
    add_host("staler", checked_at - timedelta(days=9))
    add_host("never", None)

    assert invoke(stack, checked_at) == {"hosts_stale": ["never", "staler", "stale"]}

    (message,) = stack.messages()
    lines = message.splitlines()
    assert lines[0].startswith("Hosts whose last committed backup is older than 48 hours")
    reported = [line.split(":")[0].strip() for line in lines[1:4]]
    assert reported == ["never", "staler", "stale"]
    assert "(9.0 days ago)" in lines[2]
    assert "fresh" not in message


def test_nothing_is_published_when_every_host_is_recent(stack: Stack) -> None:
    checked_at = datetime.now(timezone.utc) + timedelta(days=10)
    add_host("web-1", checked_at - timedelta(hours=47))
    assert invoke(stack, checked_at) == {"hosts_stale": []}
    assert stack.messages() == []


def test_a_new_host_is_given_time_for_its_first_backup(stack: Stack) -> None:
    add_host("just-installed", None)
    assert invoke(stack, datetime.now(timezone.utc) + timedelta(hours=1)) == {"hosts_stale": []}


def test_the_limit_comes_from_the_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    checked_at = datetime.now(timezone.utc) + timedelta(days=10)
    add_host("web-2", checked_at - timedelta(hours=30))
    monkeypatch.setenv("STALE_AFTER_HOURS", "24")
    assert invoke(stack, checked_at) == {"hosts_stale": ["web-2"]}


def test_a_host_outside_the_hosts_group_is_not_checked(stack: Stack) -> None:
    checked_at = datetime.now(timezone.utc) + timedelta(days=10)
    boto3.resource("dynamodb").Table(MANIFEST_TABLE).put_item(
        Item={"host": "retired", "manifest_id": "HEAD", "current": "20200101T000000Z-0a1b2c3d"}
    )
    assert invoke(stack, checked_at) == {"hosts_stale": []}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ALARM_TOPIC_ARN", "AlarmTopic", "ALARM_TOPIC_ARN"),
        ("STALE_AFTER_HOURS", "two days", "STALE_AFTER_HOURS"),
        ("STALE_AFTER_HOURS", "0", ">= 1"),
        ("HOSTS_GROUP", "", "HOSTS_GROUP"),
    ],
)
def test_a_misconfigured_function_fails_loudly(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    """A failure, not a quiet "all fine": the StaleHostsErrorsAlarm then tells the admin."""
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=message):
        invoke(stack, datetime.now(timezone.utc))
