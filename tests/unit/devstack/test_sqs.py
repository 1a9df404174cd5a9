"""The SQS event source mapping of the local stack (against moto)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import boto3
from moto import mock_aws
from sysbackup_local.gateway import InvocationOutcome
from sysbackup_local.sqs import SqsPoller, failed_message_ids


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
        QueueName="verify", Attributes={"VisibilityTimeout": "1", "RedrivePolicy": redrive}
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
    queue = sqs.create_queue(QueueName="verify")["QueueUrl"]
    delivered: list[str] = []

    def invoke(function: str, event: dict[str, Any]) -> InvocationOutcome:
        delivered.extend(record["body"] for record in event["Records"])
        return InvocationOutcome(result={"batchItemFailures": []})

    poller = SqsPoller(sqs, queue, "arn:queue", "VerifyPackFunction", 10, True, invoke)
    runner = threading.Thread(target=poller.run, daemon=True)
    runner.start()
    try:
        assert poller.hold(timeout=10)
        sqs.send_message(QueueUrl=queue, MessageBody="sent while held")
        time.sleep(1.5)
        assert delivered == []
        waiting = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"])
        assert waiting["Attributes"]["ApproximateNumberOfMessages"] == "1"

        poller.release()
        deadline = time.monotonic() + 10
        while not delivered and time.monotonic() < deadline:
            time.sleep(0.1)
        assert delivered == ["sent while held"]
    finally:
        poller.stop()
        runner.join(timeout=5)
