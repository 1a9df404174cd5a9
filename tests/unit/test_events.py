"""The sample events in events/ cover every trigger in template.yaml and parse as what AWS sends.

Each event is checked twice: through the powertools data class the handler wraps it in (lazy accessors),
and through the powertools parser model (strict pydantic validation of the whole shape).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEventV2, SQSEvent
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayProxyEventV2Model,
    EventBridgeModel,
    SqsModel,
)
from samtranslator.yaml_helper import yaml_parse

REPO_ROOT = Path(__file__).resolve().parents[2]
EVENTS_DIR = REPO_ROOT / "events"
TEMPLATE_PATH = REPO_ROOT / "template.yaml"

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MANIFEST_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
# The two caller shapes docs/ARCHITECTURE.md maps to a host name (section "Identity").
IAM_USER_ARN = re.compile(r"^arn:aws[\w-]*:iam::\d{12}:user/(?:[^/]+/)*(?P<name>[^/]+)$")
ASSUMED_ROLE_ARN = re.compile(r"^arn:aws[\w-]*:sts::\d{12}:assumed-role/[^/]+/(?P<session>[^/]+)$")
EVENT_FILE_NAME = re.compile(r"^(?P<folder>[a-z0-9_]+)-(?P<what>[a-z0-9-]+)\.json$")


def load_template() -> dict[str, Any]:
    return yaml_parse(TEMPLATE_PATH.read_text())


def function_folder(function: dict[str, Any]) -> str:
    """`functions/upload_api/` -> `upload_api`: events are named after the function's folder."""
    return Path(function["Properties"]["CodeUri"]).name


def template_functions() -> dict[str, dict[str, Any]]:
    resources = load_template()["Resources"]
    return {
        logical_id: resource
        for logical_id, resource in resources.items()
        if resource["Type"] == "AWS::Serverless::Function"
    }


def template_routes() -> set[tuple[str, str]]:
    """(function folder, "METHOD /path") for every HttpApi event in the template."""
    routes = set()
    for function in template_functions().values():
        for trigger in function["Properties"].get("Events", {}).values():
            if trigger["Type"] == "HttpApi":
                properties = trigger["Properties"]
                routes.add(
                    (function_folder(function), f"{properties['Method'].upper()} {properties['Path']}")
                )
    return routes


def sqs_triggered_folders() -> set[str]:
    return {
        function_folder(function)
        for function in template_functions().values()
        for trigger in function["Properties"].get("Events", {}).values()
        if trigger["Type"] == "SQS"
    }


def event_files() -> list[Path]:
    return sorted(EVENTS_DIR.glob("*.json"))


def load_event(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def is_api_event(event: dict[str, Any]) -> bool:
    return event.get("version") == "2.0" and "routeKey" in event


def api_events() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in event_files():
        event = load_event(path)
        if is_api_event(event):
            yield path, event


def is_sqs_event(event: dict[str, Any]) -> bool:
    return "Records" in event


def sqs_events() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in event_files():
        event = load_event(path)
        if is_sqs_event(event):
            yield path, event


def scheduled_events() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Events a schedule (EventBridge) hands to a function, raw or with the rule's Input."""
    for path in event_files():
        event = load_event(path)
        if not is_api_event(event) and not is_sqs_event(event):
            yield path, event


def path_template_regex(path_template: str) -> re.Pattern[str]:
    """`/manifests/{manifest_id}` -> a regex with one named group per path parameter."""
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path_template))
    return re.compile(f"^{pattern}$")


def cases(events: Iterator[tuple[Path, dict[str, Any]]] | list[tuple[Path, dict[str, Any]]]) -> list[Any]:
    """pytest parameters (path, event), each named after its file."""
    return [pytest.param(path, event, id=path.name) for path, event in events]


def caller_host(user_arn: str) -> str:
    """The host name the contract derives from the caller's ARN (a test-side restatement)."""
    for pattern, group in ((IAM_USER_ARN, "name"), (ASSUMED_ROLE_ARN, "session")):
        match = pattern.match(user_arn)
        if match:
            return match.group(group)
    raise AssertionError(f"caller ARN {user_arn!r} is neither an IAM user nor an assumed role")


# ---------------------------------------------------------------- coverage


def test_events_directory_is_not_empty() -> None:
    assert event_files(), "events/ holds no sample events"


@pytest.mark.parametrize("path", event_files(), ids=lambda path: path.name)
def test_event_file_is_named_after_an_existing_function_folder(path: Path) -> None:
    match = EVENT_FILE_NAME.match(path.name)
    assert match, f"{path.name} is not <function>-<what>.json"
    folders = {function_folder(function) for function in template_functions().values()}
    assert match["folder"] in folders


def test_every_route_in_the_template_has_a_sample_event() -> None:
    covered = {(path.name.split("-", 1)[0], event["routeKey"]) for path, event in api_events()}
    missing = template_routes() - covered
    assert not missing, f"routes without a sample event: {sorted(missing)}"


def test_every_sample_api_event_names_a_route_of_its_function() -> None:
    routes = template_routes()
    strays = {
        (path.name, event["routeKey"])
        for path, event in api_events()
        if (path.name.split("-", 1)[0], event["routeKey"]) not in routes
    }
    assert not strays, f"events for routes the template does not have: {sorted(strays)}"


def test_every_sqs_triggered_function_has_a_sample_event() -> None:
    covered = {path.name.split("-", 1)[0] for path, _ in sqs_events()}
    assert sqs_triggered_folders() <= covered


# ---------------------------------------------------------------- API events


@pytest.mark.parametrize(("path", "event"), cases(api_events()))
def test_api_event_parses_as_http_api_v2_with_iam_caller(path: Path, event: dict[str, Any]) -> None:
    model = parse(event=event, model=APIGatewayProxyEventV2Model)
    wrapped = APIGatewayProxyEventV2(event)

    method, path_template = wrapped.route_key.split(" ", 1)
    assert model.requestContext.routeKey == wrapped.route_key
    assert wrapped.request_context.http.method == method
    assert wrapped.request_context.stage == "$default"

    # rawPath is the template with the path parameters filled in, and they agree with pathParameters.
    match = path_template_regex(path_template).match(wrapped.raw_path)
    assert match, f"{wrapped.raw_path} does not fit {path_template}"
    assert match.groupdict() == (wrapped.path_parameters or {})
    assert wrapped.request_context.http.path == wrapped.raw_path

    iam = wrapped.request_context.authorizer.iam
    assert model.requestContext.authorizer is not None and model.requestContext.authorizer.iam is not None
    assert iam.account_id == wrapped.request_context.account_id
    assert HOST_NAME.match(caller_host(iam.user_arn))


@pytest.mark.parametrize(("path", "event"), cases(api_events()))
def test_api_event_body_is_json_object_only_on_post(path: Path, event: dict[str, Any]) -> None:
    wrapped = APIGatewayProxyEventV2(event)
    if wrapped.request_context.http.method == "POST":
        assert not wrapped.is_base64_encoded
        assert isinstance(wrapped.json_body, dict)
        assert wrapped.headers["content-type"] == "application/json"
        assert int(wrapped.headers["content-length"]) == len(wrapped.body.encode())
    else:
        assert wrapped.body is None


@pytest.mark.parametrize(("path", "event"), cases(api_events()))
def test_host_query_parameter_only_comes_from_an_assumed_role(path: Path, event: dict[str, Any]) -> None:
    """`?host=` is for the restore role; a sample that has a host user pass it would teach the wrong thing."""
    wrapped = APIGatewayProxyEventV2(event)
    query = wrapped.query_string_parameters or {}
    if "host" in query:
        assert ASSUMED_ROLE_ARN.match(wrapped.request_context.authorizer.iam.user_arn)
        assert HOST_NAME.match(query["host"])
        assert wrapped.raw_query_string == f"host={query['host']}"


def api_body(route_key: str) -> dict[str, Any]:
    bodies = [
        APIGatewayProxyEventV2(event).json_body for _, event in api_events() if event["routeKey"] == route_key
    ]
    assert bodies, f"no sample event for {route_key}"
    return bodies[0]


def test_packs_presign_body_follows_the_contract() -> None:
    packs = api_body("POST /packs/presign")["packs"]
    assert 0 < len(packs) <= 100
    for pack in packs:
        assert set(pack) == {"sha256", "size"}
        assert SHA256_HEX.match(pack["sha256"])
        assert 0 < pack["size"] <= 128 * 1024 * 1024


def test_manifest_commit_body_follows_the_contract() -> None:
    body = api_body("POST /manifests")
    assert set(body) == {
        "parent",
        "root",
        "snapshots",
        "warnings",
        "stats",
        "days_retained",
        "packs",
        "locations",
    }
    assert 0 < len(body["packs"]) <= 2000 and all(SHA256_HEX.match(pack) for pack in body["packs"])
    for blob, location in body["locations"].items():
        assert SHA256_HEX.match(blob)
        assert set(location) == {"pack_id", "offset", "length", "codec", "raw_length"}
        assert SHA256_HEX.match(location["pack_id"])
        assert location["codec"] in {"none", "zstd", "gzip"}
        assert location["offset"] >= 0 and location["length"] > 0 and location["raw_length"] >= 0
    assert body["parent"] is None or MANIFEST_ID.match(body["parent"])
    assert body["root"] is None or SHA256_HEX.match(body["root"])
    for snapshot in body["snapshots"]:
        assert set(snapshot) == {"name", "description", "restore_through", "size", "content", "exit_status"}
        assert SHA256_HEX.match(snapshot["content"])
    assert all(isinstance(warning, str) for warning in body["warnings"])
    assert isinstance(body["stats"], dict)


def test_downloads_body_follows_the_contract() -> None:
    body = api_body("POST /downloads")
    assert set(body) == {"packs"}
    assert 0 < len(body["packs"]) <= 200 and all(SHA256_HEX.match(value) for value in body["packs"])


def test_pack_list_queries_follow_the_contract() -> None:
    queries = [
        APIGatewayProxyEventV2(event).query_string_parameters or {}
        for _, event in api_events()
        if event["routeKey"] == "GET /packs"
    ]
    assert any("host" in query for query in queries), "no restore-role sample of GET /packs?host="
    for query in queries:
        assert set(query) <= {"host", "limit", "next"}
        if "limit" in query:
            assert 1 <= int(query["limit"]) <= 1000


def test_manifest_path_parameter_is_a_manifest_id() -> None:
    ids = [
        APIGatewayProxyEventV2(event).path_parameters["manifest_id"]
        for _, event in api_events()
        if event["routeKey"] == "GET /manifests/{manifest_id}"
    ]
    assert ids and all(MANIFEST_ID.match(value) for value in ids)


# ---------------------------------------------------------------- SQS events


@pytest.mark.parametrize(("path", "event"), cases(sqs_events()))
def test_sqs_event_parses_and_bodies_are_intact(path: Path, event: dict[str, Any]) -> None:
    model = parse(event=event, model=SqsModel)
    wrapped = SQSEvent(event)
    records = list(wrapped.records)
    assert len(records) == len(model.Records) > 0
    for record in records:
        assert record.event_source == "aws:sqs"
        # CloudFormation names the queue <stack>-<LogicalId>-<suffix>; each worker has its own queue.
        queue = {"verify_pack": "VerifyQueue", "extend_retention": "RetentionQueue"}[
            path.name.split("-", 1)[0]
        ]
        assert f"-{queue}-" in record.event_source_arn.rsplit(":", 1)[1]
        # A hand-edited body with a stale md5OfBody would not be something SQS ever delivers.
        assert record.md5_of_body == hashlib.md5(record.body.encode()).hexdigest()


def verify_requests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, event) for path, event in sqs_events() if path.name.startswith("verify_pack-")]


@pytest.mark.parametrize(("path", "event"), cases(verify_requests()))
def test_verify_request_names_packs_and_the_commit_that_sent_them(path: Path, event: dict[str, Any]) -> None:
    """`{"packs": [...], "source": manifest_id}` (<= 300 packs a message), as docs/PACK_INDEX.md says."""
    for record in SQSEvent(event).records:
        body = json.loads(record.body)
        assert set(body) == {"packs", "source"}
        assert 0 < len(body["packs"]) <= 300
        assert all(SHA256_HEX.match(pack) for pack in body["packs"])
        assert MANIFEST_ID.match(body["source"])


# ---------------------------------------------------------------- scheduled events


def scheduled_folders() -> set[str]:
    return {
        function_folder(function)
        for function in template_functions().values()
        for trigger in (function["Properties"].get("Events") or {}).values()
        if trigger["Type"] in ("Schedule", "ScheduleV2")
    }


def test_every_scheduled_function_has_a_sample_event() -> None:
    covered = {path.name.split("-", 1)[0] for path, _ in scheduled_events()}
    assert scheduled_folders() <= covered


@pytest.mark.parametrize(("path", "event"), cases(scheduled_events()))
def test_scheduled_event_is_eventbridge_or_a_dry_run_input(path: Path, event: dict[str, Any]) -> None:
    assert path.name.split("-", 1)[0] in scheduled_folders()
    if "detail-type" in event:
        parsed = parse(event=event, model=EventBridgeModel)
        assert parsed.detail_type == "Scheduled Event" and parsed.source == "aws.events"
    else:
        assert event == {"dry_run": True} or event == {"dry_run": False}
