"""S3 event notifications and SQS event source mappings, as AWS runs them, for the local stack.

SeaweedFS has no bucket-notification API, so `weed filer.meta.tail` streams the filer's metadata changes
(pretty-printed JSON objects, one per change); a new `<key>.versions/v_<id>` file under the bucket is an
object created. Records go to the queue the template's NotificationConfiguration names. A poller then
delivers SQS batches to the function like Lambda's event source mapping.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote_plus

from .gateway import InvocationOutcome
from .template import ACCOUNT_ID, REGION

log = logging.getLogger(__name__)

VERSION_FILE_PREFIX = "v_"
VERSIONS_DIR_SUFFIX = ".versions"


@dataclass(frozen=True)
class ObjectCreated:
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None
    sequencer: str


def iter_json_objects(stream: IO[str]) -> Iterator[dict[str, Any]]:
    """Consecutive JSON documents from a text stream (meta.tail pretty-prints each over many lines)."""
    decoder = json.JSONDecoder()
    buffer = ""
    for line in stream:
        buffer += line
        while True:
            stripped = buffer.lstrip()
            if not stripped:
                buffer = ""
                break
            try:
                document, end = decoder.raw_decode(stripped)
            except json.JSONDecodeError:
                buffer = stripped
                break
            buffer = stripped[end:]
            if isinstance(document, dict):
                yield document


def object_created_from_meta_event(
    event: dict[str, Any], buckets_root: str = "/buckets"
) -> ObjectCreated | None:
    """The object a filer metadata event creates, or None if it is not an object creation."""
    notification = event.get("eventNotification") or {}
    new_entry = notification.get("newEntry")
    if not new_entry or new_entry.get("isDirectory") or notification.get("oldEntry"):
        return None
    directory = str(event.get("directory", ""))
    new_parent = notification.get("newParentPath") or directory
    if not new_parent.startswith(buckets_root + "/"):
        return None
    relative = new_parent[len(buckets_root) + 1 :]
    bucket, _, folder = relative.partition("/")
    name = str(new_entry.get("name", ""))
    if folder.endswith(VERSIONS_DIR_SUFFIX) and name.startswith(VERSION_FILE_PREFIX):
        key = folder[: -len(VERSIONS_DIR_SUFFIX)]
        version_id: str | None = name[len(VERSION_FILE_PREFIX) :]
    elif folder.startswith(".uploads") or name.startswith("."):
        return None  # multipart parts and SeaweedFS' own bookkeeping
    else:
        key = f"{folder}/{name}" if folder else name
        version_id = None
    attributes = new_entry.get("attributes") or {}
    md5 = attributes.get("md5") or ""
    etag = base64.b64decode(md5).hex() if md5 else ""
    return ObjectCreated(
        bucket=bucket,
        key=key,
        size=int(attributes.get("fileSize", 0)),
        etag=etag,
        version_id=version_id,
        sequencer=f"{int(event.get('tsNs', 0)):016X}",
    )


def s3_event_record(created: ObjectCreated, now: dt.datetime) -> dict[str, Any]:
    """One record of an S3 event notification (ObjectCreated:Put), as S3 sends it to SQS."""
    obj: dict[str, Any] = {
        # S3 sends keys URL-encoded (spaces as "+"), so handlers must unquote_plus them.
        "key": quote_plus(created.key, safe="/"),
        "size": created.size,
        "eTag": created.etag,
        "sequencer": created.sequencer,
    }
    if created.version_id:
        obj["versionId"] = created.version_id
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:local"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": uuid.uuid4().hex[:16].upper()},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "local",
            "bucket": {
                "name": created.bucket,
                "ownerIdentity": {"principalId": "local"},
                "arn": f"arn:aws:s3:::{created.bucket}",
            },
            "object": obj,
        },
    }


def matches_notification(event_name: str, prefix: str, created: ObjectCreated, bucket: str) -> bool:
    return (
        created.bucket == bucket
        and event_name.startswith("s3:ObjectCreated:")
        and created.key.startswith(prefix)
    )


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
