"""Garbage collector (EventBridge schedule, GcRole): forget, mark, condemn, delete; see sysbackup_backend.gc.

The event may carry `{"dry_run": true}` to compute and return the report without writing anything.
The report is returned, logged and turned into metrics (kept, condemned, deleted, bytes freed).
"""

import os
from functools import lru_cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from sysbackup_backend.api import services
from sysbackup_backend.clients import sqs_client
from sysbackup_backend.gc import GarbageCollector, GcReport, policy_from_environment
from sysbackup_backend.retention_worker import queue_from_environment

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)

# Stop marking this long before the Lambda timeout, so the run ends cleanly and releases its lease.
RESERVE_SECONDS = 60.0
_COUNTED = {
    "ManifestsKept": "manifests_kept",
    "ManifestsForgotten": "manifests_forgotten",
    "BlobsLive": "blobs_live",
    "BlobsCondemned": "blobs_condemned",
    "BlobsRevived": "blobs_revived",
    "PacksCondemned": "packs_condemned",
    "PacksRevived": "packs_revived",
    "PacksDeleted": "packs_deleted",
    "PacksWaitingForLock": "packs_waiting_for_lock",
    "OrphanPacksDeleted": "orphan_packs_deleted",
    "LockExtensionsRequested": "lock_extensions_requested",
}


@lru_cache(maxsize=1)
def collector() -> GarbageCollector:
    backend = services()
    return GarbageCollector(
        registry=backend.registry,
        store=backend.store,
        catalogue=backend.catalogue,
        jobs_table=backend.settings.jobs_table,
        policy=policy_from_environment(os.environ),
        lock_mode=backend.settings.retention.lock_mode,
        retention_queue=queue_from_environment(os.environ, sqs_client),
    )


def is_dry_run(event: Any) -> bool:
    """Only a literal `"dry_run": true` asks for a dry run; anything else there is refused."""
    if not isinstance(event, dict) or "dry_run" not in event:
        return False
    if not isinstance(event["dry_run"], bool):
        raise ValueError(f"dry_run must be true or false, got {event['dry_run']!r}")
    return bool(event["dry_run"])


def emit_metrics(report: GcReport) -> None:
    if report.dry_run or report.skipped:
        return
    for name, attribute in _COUNTED.items():
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=getattr(report, attribute))
    metrics.add_metric(name="BytesFreed", unit=MetricUnit.Bytes, value=report.bytes_freed)
    metrics.add_metric(name="GcIncomplete", unit=MetricUnit.Count, value=0 if report.complete else 1)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    dry_run = is_dry_run(event)
    seconds = context.get_remaining_time_in_millis() / 1000 - RESERVE_SECONDS
    report = collector().run(dry_run=dry_run, seconds=max(seconds, 1.0))
    logger.info("gc finished" if report.complete else "gc did not finish", extra={"report": report.to_json()})
    emit_metrics(report)
    return report.to_json()
