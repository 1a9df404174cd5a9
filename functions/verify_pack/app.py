"""Pack verifier (SQS VerifyQueue): re-read the larger packs a commit used; record them verified or corrupt.

Each message is `{"packs": [...], "source": manifest_id}`, sent by a commit after HEAD moved. A pack that is
not `presigned` any more is skipped (verified inline, already decided, or gc has it). A corrupt pack is a
result, recorded and reported, not an error to retry. A message the model refuses, or a failure to reach S3
or DynamoDB, fails its record: SQS redelivers it and after five receives parks it in the dead-letter queue,
which raises an alarm.
"""

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field, Json
from sysbackup_backend.pack_access import BlobHash, pack_access
from sysbackup_backend.registry import PACK_CORRUPT, PACK_VERIFIED
from sysbackup_backend.verification import SKIPPED, VerifyOutcome, verify_registered_packs

MAX_PACKS_PER_MESSAGE = 300

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)


class VerifyRequest(BaseModel):
    packs: list[BlobHash] = Field(min_length=1, max_length=MAX_PACKS_PER_MESSAGE)
    source: str = Field(max_length=200)  # the manifest whose commit queued them (for the logs)


class VerifyRecord(SqsRecordModel):
    body: Json[VerifyRequest]  # type: ignore[assignment]  # SqsRecordModel's body is the raw string


processor = BatchProcessor(event_type=EventType.SQS, model=VerifyRecord)


def report(outcome: VerifyOutcome, source: str) -> None:
    context = {
        "pack_id": outcome.pack_id,
        "source": source,
        "result": outcome.result,
        "detail": outcome.detail,
    }
    if outcome.result == PACK_CORRUPT:
        logger.error("corrupt pack", extra=context)
        metrics.add_metric(name="PacksCorrupt", unit=MetricUnit.Count, value=1)
    elif outcome.result == PACK_VERIFIED:
        logger.info("pack verified", extra=context)
        metrics.add_metric(name="PacksVerified", unit=MetricUnit.Count, value=1)
    elif outcome.result == SKIPPED:
        logger.info("pack not presigned; skipped", extra=context)
    else:  # absent, or gc took it while it was read
        logger.warning("pack not verified", extra=context)


@tracer.capture_method
def record_handler(record: VerifyRecord) -> None:
    backend = pack_access()
    pack_ids = dict.fromkeys(record.body.packs)  # once each, in the message's order
    for outcome in verify_registered_packs(backend.registry, backend.store, pack_ids):
        report(outcome, record.body.source)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
