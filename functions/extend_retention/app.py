"""Pack lock extender (SQS RetentionQueue): lock packs as long as the manifests that use them.

Each message is an ExtensionRequest (sysbackup_backend.retention_worker). A malformed message is logged and
dropped (retrying cannot fix it); a failure to reach S3 or DynamoDB raises, so SQS redelivers the message
and after five receives parks it in the dead-letter queue, which raises an alarm.
"""

import json
from functools import lru_cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from sysbackup_backend.api import services
from sysbackup_backend.clients import s3_client
from sysbackup_backend.retention_worker import ExtensionRequest, LockExtender
from sysbackup_domain.errors import InvalidDocument

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)
processor = BatchProcessor(event_type=EventType.SQS)


@lru_cache(maxsize=1)
def extender() -> LockExtender:
    backend = services()
    return LockExtender(
        registry=backend.registry,
        s3=s3_client(),
        bucket=backend.settings.bucket_name,
        lock_mode=backend.settings.retention.lock_mode,
        fold_window=backend.settings.fold_window,
    )


def parse_request(body: str) -> ExtensionRequest | None:
    try:
        return ExtensionRequest.from_json(json.loads(body))
    except (ValueError, InvalidDocument) as error:
        logger.error("malformed extension request; dropped", extra={"reason": str(error), "body": body[:200]})
        return None


@tracer.capture_method
def record_handler(record: SQSRecord) -> None:
    request = parse_request(record.body)
    if request is None:
        return
    report = extender().apply(request)
    metrics.add_metric(name="PackLocksExtended", unit=MetricUnit.Count, value=len(report.extended))
    logger.info("pack locks checked", extra={"source": request.source, **report.to_json()})


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
