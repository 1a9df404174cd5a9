"""bench/compare.py's accounting: server counters parsed, DynamoDB capacity and AWS cost modelled."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import compare
from compare import PRICES, MotoRecording, Usage, dynamodb_capacity, parse_s3_requests

METRICS = """# HELP SeaweedFS_s3_request_total Counter of s3 requests.
# TYPE SeaweedFS_s3_request_total counter
SeaweedFS_s3_request_total{bucket="",code="200",type="IAM-Unified"} 5
SeaweedFS_s3_request_total{bucket="ours",code="200",type="PUT"} 3
SeaweedFS_s3_request_total{bucket="ours",code="412",type="PUT"} 1
SeaweedFS_s3_request_total{bucket="ours",code="206",type="GET"} 7
SeaweedFS_s3_request_total{bucket="restic-tree",code="200",type="LIST"} 2
SeaweedFS_s3_request_histogram_bucket{bucket="ours",type="PUT",le="0.1"} 9
"""


def test_s3_requests_are_summed_per_bucket_and_type_whatever_the_status() -> None:
    counts = parse_s3_requests(METRICS)
    assert counts["ours"] == Counter({"PUT": 4, "GET": 7})
    assert counts["restic-tree"] == Counter({"LIST": 2})
    assert counts[""] == Counter({"IAM-Unified": 5})


SMALL_ITEM = {"pk": {"S": "a"}}


@pytest.mark.parametrize(
    ("operation", "body", "expected"),
    [
        ("GetItem", {"Key": {}}, (0.5, 0.0)),
        ("GetItem", {"Key": {}, "ConsistentRead": True}, (1.0, 0.0)),
        ("BatchGetItem", {"RequestItems": {"t": {"Keys": [{}, {}, {}]}}}, (1.5, 0.0)),
        ("PutItem", {"Item": {"pk": {"S": "x" * 2000}}}, (0.0, 2.0)),
        (
            "BatchWriteItem",
            {"RequestItems": {"t": [{"PutRequest": {"Item": {"pk": {"S": "a"}}}}] * 4}},
            (0, 4),
        ),
        (
            "TransactWriteItems",
            {"TransactItems": [{"Put": {"Item": {"pk": {"S": "a"}}}}, {"ConditionCheck": {}}]},
            (0, 4),
        ),
        ("DescribeTable", {}, (0.0, 0.0)),
    ],
)
def test_dynamodb_capacity_model(operation: str, body: dict, expected: tuple[float, float]) -> None:
    assert dynamodb_capacity(operation, body) == pytest.approx(expected)


def test_cost_bills_each_kind_at_its_price() -> None:
    usage = Usage(s3=Counter({"PUT": 2, "LIST": 1, "GET": 10}), api_calls=3, lambda_invocations=4)
    usage.gb_s_by_function, usage.rru, usage.wru, usage.sqs_messages = Counter(F=1.5, G=0.5), 8.0, 6.0, 1
    expected = (
        3 * PRICES["s3 PUT/COPY/POST/LIST"]
        + 10 * PRICES["s3 GET/HEAD/other"]
        + 3 * PRICES["api gateway HTTP API request"]
        + 4 * PRICES["lambda request"]
        + 2.0 * PRICES["lambda GB-second (x86)"]
        + 8 * PRICES["dynamodb on-demand RRU"]
        + 6 * PRICES["dynamodb on-demand WRU"]
        + 3 * PRICES["sqs standard request"]
    )
    assert usage.cost() == pytest.approx(expected)
    assert usage.billed_requests == 13 + 3 + 4 + 3  # S3, API, Lambda, one message = 3 SQS requests


def test_recording_is_read_entry_by_entry_even_when_lines_interleave(tmp_path: Path) -> None:
    recording = MotoRecording.__new__(MotoRecording)
    recording.path, recording.offset = tmp_path / "moto_recording", 0
    get = json.dumps({"headers": {"X-Amz-Target": "DynamoDB_20120810.GetItem"}, "body": '{"Key": {}}'})
    send = json.dumps({"headers": {"x-amz-target": "AmazonSQS.SendMessage"}, "body": ""})
    other = json.dumps({"headers": {}, "body": ""})  # not a JSON-protocol request
    recording.path.write_text(get + send + "\n\n" + other + "\n" + get[:10])
    assert list(recording.new_requests()) == [
        ("dynamodb", "GetItem", {"Key": {}}),
        ("sqs", "SendMessage", {}),
    ]
    with recording.path.open("a") as stream:
        stream.write(get[10:] + "\n")  # the half-written entry completes
    assert list(recording.new_requests()) == [("dynamodb", "GetItem", {"Key": {}})]
    assert list(recording.new_requests()) == []


def test_unknown_cases_are_refused() -> None:
    with pytest.raises(SystemExit, match="unknown cases"):
        compare.main(["--only", "tree,nope"])
