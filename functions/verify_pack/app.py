"""Pack verifier: re-read a landed pack, re-hash every blob, index them as verified (or the pack as corrupt).

SQS messages carry S3 ObjectCreated notifications for `packs/`. A corrupt pack is a result, recorded and
reported, not an error to retry; a failure to reach S3 or DynamoDB raises so SQS redelivers the message.
"""

import hashlib
import json
from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes import S3Event
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError
from sysbackup_backend.api import services
from sysbackup_backend.index import PACK_CORRUPT, PACK_DELETING, PACK_VERIFIED, PackCollecting
from sysbackup_backend.store import PACKS_PREFIX, pack_key
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.hashing import is_blob_hash
from sysbackup_domain.packs import verify_pack

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)
processor = BatchProcessor(event_type=EventType.SQS)


def landed_pack_ids(body: str) -> list[str]:
    """Pack ids named by one S3 notification message; other keys and S3's test event name none."""
    try:
        notification = json.loads(body)
    except ValueError:
        logger.error("message body is not JSON; dropped", extra={"body": body[:200]})
        return []
    if not isinstance(notification, dict) or "Records" not in notification:
        logger.info("not an S3 object notification; ignored", extra={"event": notification})
        return []
    bucket = services().settings.bucket_name
    pack_ids = []
    for record in S3Event(notification).records:
        key = unquote_plus(record.s3.get_object.key)
        if record.s3.bucket.name != bucket or not key.startswith(PACKS_PREFIX):
            logger.info(
                "not a pack of our bucket; ignored", extra={"bucket": record.s3.bucket.name, "key": key}
            )
            continue
        pack_id = key.removeprefix(PACKS_PREFIX)
        if not is_blob_hash(pack_id):
            logger.warning("pack key is not a SHA-256; ignored", extra={"key": key})
            continue
        pack_ids.append(pack_id)
    return pack_ids


def _read_pack(pack_id: str) -> bytes | None:
    try:
        return services().store.read(pack_key(pack_id))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise


@tracer.capture_method
def verify_landed_pack(pack_id: str) -> str:
    """Verify one pack; returns the pack's resulting state (idempotent: a decided pack is not re-read)."""
    backend = services()
    item = backend.index.get_pack(pack_id) or {}
    if item.get("state") in (PACK_VERIFIED, PACK_CORRUPT):
        return str(item["state"])
    data = _read_pack(pack_id)
    if data is None:
        logger.warning("notified pack is not in the bucket", extra={"pack_id": pack_id})
        return "absent"
    try:
        if hashlib.sha256(data).hexdigest() != pack_id:
            raise CorruptBlob("the pack's bytes do not hash to its key")
        entries = verify_pack(data)
    except (CorruptBlob, InvalidDocument) as error:
        backend.index.record_corrupt(pack_id, str(error))
        logger.error(
            "corrupt pack", extra={"pack_id": pack_id, "reason": str(error), "host": item.get("host")}
        )
        metrics.add_metric(name="PacksCorrupt", unit=MetricUnit.Count, value=1)
        return PACK_CORRUPT
    try:
        fresh = backend.index.record_verified(pack_id, entries)
    except PackCollecting:  # gc is deleting it: nothing may be indexed into it
        logger.info("pack is being collected by gc; not indexed", extra={"pack_id": pack_id})
        return PACK_DELETING
    metrics.add_metric(name="PacksVerified", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="BlobsVerified", unit=MetricUnit.Count, value=fresh)
    logger.info("pack verified", extra={"pack_id": pack_id, "blobs": len(entries), "new_blobs": fresh})
    return PACK_VERIFIED


def record_handler(record: SQSRecord) -> None:
    for pack_id in landed_pack_ids(record.body):
        verify_landed_pack(pack_id)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
