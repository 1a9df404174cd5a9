"""S3 notifications from SeaweedFS metadata events, and the SQS event source mapping (against moto)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import threading
import time
from typing import Any

import boto3
from moto import mock_aws
from sysbackup_local.gateway import InvocationOutcome
from sysbackup_local.notifications import (
    SqsPoller,
    failed_message_ids,
    iter_json_objects,
    object_created_from_meta_event,
    s3_event_record,
)


def meta_event(
    directory: str, name: str, size: int = 5, body: bytes = b"hello", old: bool = False
) -> dict[str, Any]:
    entry = {
        "name": name,
        "isDirectory": False,
        "attributes": {"fileSize": str(size), "md5": base64.b64encode(hashlib.md5(body).digest()).decode()},
    }
    return {
        "directory": directory,
        "eventNotification": {
            "oldEntry": entry if old else None,
            "newEntry": entry,
            "newParentPath": directory,
        },
        "tsNs": "1795304913782968341",
    }


def test_pretty_printed_documents_are_split() -> None:
    documents = [{"a": {"b": [1, 2]}}, {"c": "}{"}]
    stream = io.StringIO("".join(json.dumps(item, indent=2) + "\n" for item in documents))

    assert list(iter_json_objects(stream)) == documents


def test_a_new_version_file_is_an_object_created() -> None:
    event = meta_event("/buckets/bkt/packs/abc.versions", "v_0123abcd")

    created = object_created_from_meta_event(event)

    assert created is not None
    assert (created.bucket, created.key, created.version_id, created.size) == (
        "bkt",
        "packs/abc",
        "0123abcd",
        5,
    )
    assert created.etag == hashlib.md5(b"hello").hexdigest()


def test_updates_directories_and_uploads_are_not_creations() -> None:
    assert (
        object_created_from_meta_event(meta_event("/buckets/bkt/packs/abc.versions", "v_1", old=True)) is None
    )
    assert object_created_from_meta_event(meta_event("/buckets/bkt/.uploads/x", "0001.part")) is None
    assert object_created_from_meta_event(meta_event("/etc/iam", "identity.json")) is None
    directory = meta_event("/buckets/bkt", "abc.versions")
    directory["eventNotification"]["newEntry"]["isDirectory"] = True
    assert object_created_from_meta_event(directory) is None


def test_the_record_has_what_the_verifier_reads() -> None:
    created = object_created_from_meta_event(meta_event("/buckets/bkt/packs/abc.versions", "v_9"))
    assert created is not None

    record = s3_event_record(created, dt.datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=dt.timezone.utc))

    assert record["eventSource"] == "aws:s3"
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["eventTime"] == "2026-11-21T12:00:00.123Z"
    assert record["s3"]["bucket"]["name"] == "bkt"
    assert record["s3"]["object"]["key"] == "packs/abc"
    assert record["s3"]["object"]["versionId"] == "9"


def test_keys_are_url_encoded_as_s3_sends_them() -> None:
    created = object_created_from_meta_event(meta_event("/buckets/bkt/packs/a b+c.versions", "v_1"))
    assert created is not None

    record = s3_event_record(created, dt.datetime.now(dt.timezone.utc))

    assert record["s3"]["object"]["key"] == "packs/a+b%2Bc"


def test_failed_ids_follow_lambda_partial_batch_rules() -> None:
    ids = ["m1", "m2", "m3"]

    assert failed_message_ids(InvocationOutcome(result={"batchItemFailures": []}), ids, True) == set()
    partial = InvocationOutcome(result={"batchItemFailures": [{"itemIdentifier": "m2"}]})
    assert failed_message_ids(partial, ids, True) == {"m2"}
    assert failed_message_ids(partial, ids, False) == set()
    unknown = InvocationOutcome(result={"batchItemFailures": [{"itemIdentifier": "zz"}]})
    assert failed_message_ids(unknown, ids, True) == set(ids)
    assert failed_message_ids(InvocationOutcome(error={"errorType": "X"}), ids, True) == set(ids)


@mock_aws
def test_the_poller_deletes_successes_and_dead_letters_repeated_failures() -> None:
    sqs = boto3.client("sqs", region_name="us-east-1")
    dead = sqs.create_queue(QueueName="dead")["QueueUrl"]
    dead_arn = sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": "2"})
    queue = sqs.create_queue(
        QueueName="landed", Attributes={"VisibilityTimeout": "1", "RedrivePolicy": redrive}
    )["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody="good")
    sqs.send_message(QueueUrl=queue, MessageBody="bad")
    seen: list[str] = []

    def invoke(function: str, event: dict[str, Any]) -> InvocationOutcome:
        failures = []
        for record in event["Records"]:
            seen.append(record["body"])
            assert record["eventSource"] == "aws:sqs"
            if record["body"] == "bad":
                failures.append({"itemIdentifier": record["messageId"]})
        return InvocationOutcome(result={"batchItemFailures": failures})

    poller = SqsPoller(sqs, queue, "arn:queue", "VerifyPackFunction", 10, True, invoke)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not sqs.receive_message(QueueUrl=dead, VisibilityTimeout=0).get(
        "Messages"
    ):
        poller.poll_once()
        time.sleep(0.3)

    assert seen.count("good") == 1
    assert seen.count("bad") == 2
    [dead_letter] = sqs.receive_message(QueueUrl=dead)["Messages"]
    assert dead_letter["Body"] == "bad"


@mock_aws
def test_held_deliveries_wait_in_the_queue_until_released() -> None:
    sqs = boto3.client("sqs", region_name="us-east-1")
    queue = sqs.create_queue(QueueName="landed")["QueueUrl"]
    delivered: list[str] = []

    def invoke(function: str, event: dict[str, Any]) -> InvocationOutcome:
        delivered.extend(record["body"] for record in event["Records"])
        return InvocationOutcome(result={"batchItemFailures": []})

    poller = SqsPoller(sqs, queue, "arn:queue", "VerifyPackFunction", 10, True, invoke)
    runner = threading.Thread(target=poller.run, daemon=True)
    runner.start()
    try:
        assert poller.hold(timeout=10)
        sqs.send_message(QueueUrl=queue, MessageBody="landed while held")
        time.sleep(1.5)
        assert delivered == []
        waiting = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"])
        assert waiting["Attributes"]["ApproximateNumberOfMessages"] == "1"

        poller.release()
        deadline = time.monotonic() + 10
        while not delivered and time.monotonic() < deadline:
            time.sleep(0.1)
        assert delivered == ["landed while held"]
    finally:
        poller.stop()
        runner.join(timeout=5)
