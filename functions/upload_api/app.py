"""Upload API: presigned pack uploads, and which packs are already stored for the caller."""

from datetime import datetime, timezone
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field
from sysbackup_backend.api import register_error_handlers, services, writing_host
from sysbackup_backend.pack_access import BlobHash
from sysbackup_backend.presign import Presigner, refuse_collecting, refuse_corrupt
from sysbackup_domain.packs import MAX_PACK_BYTES, TRAILER_TAIL_BYTES
from sysbackup_domain.retention import iso_utc, retain_until

MAX_PACKS_PER_CALL = 100

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)
app = APIGatewayHttpResolver(enable_validation=True)
register_error_handlers(app, logger)


class PackToPresign(BaseModel):
    sha256: BlobHash
    size: int = Field(gt=TRAILER_TAIL_BYTES, le=MAX_PACK_BYTES)


class PresignRequest(BaseModel):
    packs: list[PackToPresign] = Field(min_length=1, max_length=MAX_PACKS_PER_CALL)


@app.post("/packs/presign")
@tracer.capture_method
def presign_packs(request: PresignRequest) -> dict[str, Any]:
    host = writing_host(app)
    backend = services()
    settings = backend.settings
    # Locked for the stack's default period plus the fold window: the commit that follows finds the lock
    # sufficient (no extension message); the extender stretches it only for longer or later manifests.
    lock_until = retain_until(datetime.now(timezone.utc), settings.retention, None) + settings.fold_window
    sizes = {pack.sha256: pack.size for pack in request.packs}
    plan = Presigner(backend.registry, backend.store).plan(host, sizes, lock_until)
    refuse_corrupt(plan.corrupt)
    refuse_collecting(plan.collecting)
    uploads = []
    for pack_id, pack_lock_until in plan.uploads.items():
        upload = backend.store.presign_pack_put(
            pack_id,
            sizes[pack_id],
            pack_lock_until,
            settings.retention.lock_mode,
            settings.upload_url_expiry_seconds,
        )
        uploads.append(
            {
                "pack_id": pack_id,
                "url": upload.url,
                "method": "PUT",
                "headers": upload.headers,
                "expires_at": iso_utc(upload.expires_at),
            }
        )
    metrics.add_metric(name="PacksPresigned", unit=MetricUnit.Count, value=len(uploads))
    metrics.add_metric(name="PacksAlreadyStored", unit=MetricUnit.Count, value=len(plan.stored))
    return {"uploads": uploads, "stored": sorted(plan.stored)}


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
