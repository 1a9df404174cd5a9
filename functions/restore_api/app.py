"""Restore API: a host's packs (`GET /packs`) and short-lived presigned GETs for them (`POST /downloads`).

Where each blob is comes from the packs' own trailers, read by the host with ranged GETs of these URLs.
Restore principals may name the host with `?host=`; everyone else reads only their own.
"""

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field
from sysbackup_backend.api import (
    page_limit,
    reading_host,
    register_error_handlers,
    services,
)
from sysbackup_backend.downloads import (
    DEFAULT_PACK_PAGE_LIMIT,
    MAX_PACK_PAGE_LIMIT,
    MAX_PACKS_PER_DOWNLOAD,
    download_urls,
    pack_page,
)
from sysbackup_backend.pack_access import BlobHash

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)
app = APIGatewayHttpResolver(enable_validation=True)
register_error_handlers(app, logger)


class DownloadRequest(BaseModel):
    packs: list[BlobHash] = Field(min_length=1, max_length=MAX_PACKS_PER_DOWNLOAD)


@app.get("/packs")
@tracer.capture_method
def list_packs() -> dict[str, Any]:
    host = reading_host(app)
    token = app.current_event.get_query_string_value("next")
    return pack_page(
        services().registry, host, page_limit(app, DEFAULT_PACK_PAGE_LIMIT, MAX_PACK_PAGE_LIMIT), token
    )


@app.post("/downloads")
@tracer.capture_method
def downloads(request: DownloadRequest) -> dict[str, Any]:
    host = reading_host(app)
    backend = services()
    answer = download_urls(
        backend.registry, backend.store, host, request.packs, backend.settings.download_url_expiry_seconds
    )
    metrics.add_metric(name="PackUrlsIssued", unit=MetricUnit.Count, value=len(answer.urls))
    if answer.missing:
        logger.info("packs refused", extra={"host": host, "missing": answer.missing})
    return answer.to_json()


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
