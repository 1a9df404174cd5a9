"""Restore API: where blobs are, with short-lived presigned GET URLs for their packs."""

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field
from sysbackup_backend.api import BlobHash, register_error_handlers, request_caller, services
from sysbackup_backend.identity import target_host
from sysbackup_backend.store import pack_key

MAX_BLOBS_PER_CALL = 1000

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)
app = APIGatewayHttpResolver(enable_validation=True)
register_error_handlers(app, logger)


class DownloadRequest(BaseModel):
    blobs: list[BlobHash] = Field(min_length=1, max_length=MAX_BLOBS_PER_CALL)


@app.post("/downloads")
@tracer.capture_method
def downloads(request: DownloadRequest) -> dict[str, Any]:
    host = target_host(request_caller(app), app.current_event.get_query_string_value("host"))
    backend = services()
    # v1: any blob stored for the host (its own claims or verified), not only those its manifests reach.
    locations = backend.index.locate(host, request.blobs)
    expiry = backend.settings.download_url_expiry_seconds
    urls = {
        pack_id: backend.store.presign_get(pack_key(pack_id), expiry)
        for pack_id in sorted({location.pack_id for location in locations.values()})
    }
    missing = sorted(set(request.blobs) - set(locations))
    metrics.add_metric(name="BlobsLocated", unit=MetricUnit.Count, value=len(locations))
    return {
        "locations": {blob: location.to_json() for blob, location in locations.items()},
        "urls": urls,
        "missing": missing,
    }


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
