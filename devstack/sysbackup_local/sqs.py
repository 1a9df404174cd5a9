"""SQS event source mappings, as Lambda runs them, for the local stack.

A poller per SQS trigger in template.yaml delivers batches of its queue's messages to the function and
deletes what the function did not report as failed (partial batch responses), as Lambda does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .gateway import InvocationOutcome
from .template import ACCOUNT_ID, REGION

log = logging.getLogger(__name__)


def sqs_event(messages: Iterable[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda's SQS event source mapping hands to a function."""
    records = []
    for message in messages:
        attributes = message.get("Attributes", {})
        records.append(
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": {
                    "ApproximateReceiveCount": attributes.get("ApproximateReceiveCount", "1"),
                    "SentTimestamp": attributes.get("SentTimestamp", str(int(time.time() * 1000))),
                    "SenderId": attributes.get("SenderId", ACCOUNT_ID),
                    "ApproximateFirstReceiveTimestamp": attributes.get(
                        "ApproximateFirstReceiveTimestamp", str(int(time.time() * 1000))
                    ),
                },
                "messageAttributes": {},
                "md5OfBody": message.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
        )
    return {"Records": records}


def failed_message_ids(outcome: InvocationOutcome, message_ids: list[str], partial_batch: bool) -> set[str]:
    """Messages to leave on the queue: all of them if the function failed, else those it reported."""
    if outcome.error is not None:
        return set(message_ids)
    if not partial_batch or not isinstance(outcome.result, dict):
        return set()
    failures = outcome.result.get("batchItemFailures") or []
    reported = {str(item.get("itemIdentifier")) for item in failures if isinstance(item, dict)}
    # Lambda treats an unknown or empty identifier as a failure of the whole batch.
    if any(item not in message_ids for item in reported):
        return set(message_ids)
    return reported


class SqsPoller:
    """Lambda's SQS event source mapping for one function and queue."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        queue_arn: str,
        function: str,
        batch_size: int,
        partial_batch: bool,
        invoke: Callable[[str, dict[str, Any]], InvocationOutcome],
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.queue_arn = queue_arn
        self.function = function
        self.batch_size = batch_size
        self.partial_batch = partial_batch
        self._invoke = invoke
        self.busy = False
        self._stop = threading.Event()
        # Tests hold deliveries back (messages wait in the queue, as behind a disabled event source mapping).
        self._hold = threading.Event()
        self._held = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def hold(self, timeout: float = 30.0) -> bool:
        """Stop delivering; True once no batch is in flight (the current one, if any, has finished)."""
        self._held.clear()
        self._hold.set()
        return self._held.wait(timeout)

    def release(self) -> None:
        self._hold.clear()

    @property
    def held(self) -> bool:
        return self._hold.is_set()

    def poll_once(self) -> int:
        response = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=min(self.batch_size, 10),
            WaitTimeSeconds=1,
            AttributeNames=["All"],
        )
        messages = response.get("Messages", [])
        if not messages:
            return 0
        self.busy = True
        try:
            outcome = self._invoke(self.function, sqs_event(messages, self.queue_arn))
            ids = [message["MessageId"] for message in messages]
            keep = failed_message_ids(outcome, ids, self.partial_batch)
            done = [
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                for index, message in enumerate(messages)
                if message["MessageId"] not in keep
            ]
            if done:
                self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=done)
            return len(messages)
        finally:
            self.busy = False

    def run(self) -> None:
        while not self._stop.is_set():
            if self._hold.is_set():
                self._held.set()
                self._stop.wait(0.1)
                continue
            try:
                self.poll_once()
            except Exception:  # a moto hiccup must not end event delivery for the stack's lifetime
                log.exception("polling %s failed", self.queue_url)
                self._stop.wait(1)
