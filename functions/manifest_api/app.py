"""Manifest API: commit a manifest (maybe as a polled job), list and read a host's manifests."""

import re
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from sysbackup_backend.api import (
    json_body,
    json_response,
    page_limit,
    reading_host,
    register_error_handlers,
    services,
    walk_budget,
    writing_host,
)
from sysbackup_backend.catalogue import DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, manifest_after, page_token
from sysbackup_backend.commit import CommitOutcome
from sysbackup_backend.errors import NotFound
from sysbackup_domain.manifest import is_manifest_id

JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

logger = Logger()
tracer = Tracer()
metrics = Metrics()  # namespace from POWERTOOLS_METRICS_NAMESPACE (template Globals)
app = APIGatewayHttpResolver()
register_error_handlers(app, logger)


def _answer(outcome: CommitOutcome) -> Response:
    if outcome.status_code == 201:
        metrics.add_metric(name="ManifestsCommitted", unit=MetricUnit.Count, value=1)
    elif outcome.status_code == 202:
        metrics.add_metric(name="CommitsDeferred", unit=MetricUnit.Count, value=1)
    return json_response(outcome.status_code, outcome.body)


@app.post("/manifests")
@tracer.capture_method
def create_manifest() -> Response:
    """201 committed, 202 {job_id} to poll, 409 {current} for a stale parent, 422 {message, missing, packs}
    when blobs are not stored in the parent or a listed pack the host may use (docs/PACK_INDEX.md)."""
    host = writing_host(app)
    return _answer(services().committer.start(host, json_body(app), walk_budget(app)))


@app.get("/jobs/<job_id>")
@tracer.capture_method
def poll_job(job_id: str) -> Response:
    host = writing_host(app)
    if not JOB_ID_RE.fullmatch(job_id):
        raise NotFound(f"no job {job_id!r}")
    return _answer(services().committer.resume(host, job_id, walk_budget(app)))


@app.get("/manifests")
@tracer.capture_method
def list_manifests() -> dict[str, Any]:
    """One page of summaries, newest first (a host's list can outgrow Lambda's 6 MB response)."""
    host = reading_host(app)
    limit = page_limit(app, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT)
    token = app.current_event.get_query_string_value("next")
    after = manifest_after(token, host) if token is not None else None
    catalogue = services().catalogue
    page = catalogue.page(host, limit, after)
    return {
        "manifests": [summary.to_json() for summary in page.summaries],
        "next": page_token(host, page.next_after) if page.next_after else None,
        "head": catalogue.head(host),
    }


@app.get("/manifests/<manifest_id>")
@tracer.capture_method
def get_manifest(manifest_id: str) -> Response:
    host = reading_host(app)
    # Only catalogued manifests are served: an orphaned document (a crash mid-commit) was never committed.
    summary = services().catalogue.get(host, manifest_id) if is_manifest_id(manifest_id) else None
    if summary is None:
        raise NotFound(f"no manifest {manifest_id!r} for host {host!r}")
    document = services().store.read(summary.key)
    return Response(status_code=200, content_type="application/json", body=document.decode("utf-8"))


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
