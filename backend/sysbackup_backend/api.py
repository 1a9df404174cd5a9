"""What every API handler shares: the caller, error responses, the JSON body, the backend services."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError

from .catalogue import Catalogue
from .clients import dynamodb_client, sqs_client
from .commit import Committer, verify_queue_from_environment
from .errors import ApiError, BadRequest, Forbidden
from .identity import Caller, caller, target_host
from .jobs import JobStore
from .pack_access import pack_access
from .registry import PackRegistry
from .retention_worker import queue_from_environment
from .settings import Settings, get_settings
from .store import PackStore
from .walk import Budget

# API Gateway gives up on an integration after 29 s; leave room for the commit's writes and the response.
WALK_BUDGET_SECONDS = 20.0
WALK_RESERVE_SECONDS = 6.0


@dataclass(frozen=True)
class Services:
    settings: Settings
    registry: PackRegistry
    store: PackStore
    catalogue: Catalogue
    jobs: JobStore
    committer: Committer


@lru_cache(maxsize=1)
def services() -> Services:
    """The backend objects of this process, built on first use (settings and clients are read once)."""
    settings = get_settings()
    access = pack_access()
    registry, store = access.registry, access.store
    catalogue = Catalogue(settings.manifest_table, dynamodb_client())
    jobs = JobStore(settings.jobs_table, dynamodb_client())
    return Services(
        settings=settings,
        registry=registry,
        store=store,
        catalogue=catalogue,
        jobs=jobs,
        committer=Committer(
            registry,
            store,
            catalogue,
            jobs,
            settings.retention,
            retention_queue=queue_from_environment(os.environ, sqs_client),
            verify_queue=verify_queue_from_environment(os.environ, sqs_client),
        ),
    )


def json_response(status_code: int, body: dict[str, Any]) -> Response:
    return Response(status_code=status_code, content_type=content_types.APPLICATION_JSON, body=body)


def request_caller(app: APIGatewayHttpResolver) -> Caller:
    """The authenticated caller of the current request (identity.caller raises Forbidden)."""
    return caller(app.current_event.raw_event, services().settings.restore_principal_arns)


def reading_host(app: APIGatewayHttpResolver) -> str:
    """The host a read is for: the caller's own, or `?host=` for a restore principal."""
    return target_host(request_caller(app), app.current_event.get_query_string_value("host"))


def page_limit(app: APIGatewayHttpResolver, default: int, maximum: int) -> int:
    """The request's `?limit=` (1..maximum), or `default` without one; BadRequest otherwise."""
    text = app.current_event.get_query_string_value("limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise BadRequest(f"`limit` must be an integer from 1 to {maximum}")
    return int(text)


def writing_host(app: APIGatewayHttpResolver) -> str:
    """The host a write (upload, commit) is for: the caller's own; the restore role only reads."""
    who = request_caller(app)
    if who.is_restore:
        raise Forbidden("the restore role may read backups, not write them")
    return who.host


def json_body(app: APIGatewayHttpResolver) -> Any:
    raw = app.current_event.decoded_body
    if not raw:
        raise BadRequest("the request needs a JSON body")
    try:
        return json.loads(raw)
    except ValueError as error:
        raise BadRequest(f"the body is not valid JSON: {error}") from None


def walk_budget(app: APIGatewayHttpResolver) -> Budget:
    """Time for this call's share of a commit walk, within the Lambda's own remaining time."""
    context = app.lambda_context
    seconds = WALK_BUDGET_SECONDS
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        seconds = min(seconds, context.get_remaining_time_in_millis() / 1000 - WALK_RESERVE_SECONDS)
    return Budget(max(seconds, 0.0))


def _validation_message(error: RequestValidationError) -> str:
    problems = []
    for detail in error.errors()[:5]:
        location = ".".join(str(part) for part in detail.get("loc", ()) if part != "body")
        problems.append(f"{location or 'body'}: {detail.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems)


def register_error_handlers(app: APIGatewayHttpResolver, logger: Logger) -> None:
    """Refusals become `{"message": ...}` with their 4xx; never a 500 for a bad request."""

    @app.exception_handler(ApiError)
    def handle_api_error(error: ApiError) -> Response:
        logger.info("request refused", extra={"status": error.status_code, "reason": error.message})
        return json_response(error.status_code, error.body())

    @app.exception_handler(RequestValidationError)
    def handle_validation_error(error: RequestValidationError) -> Response:
        message = _validation_message(error)
        logger.info("request invalid", extra={"reason": message})
        return json_response(422, {"message": message})
