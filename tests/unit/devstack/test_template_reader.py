"""The local stack reads its resources and routes from template.yaml."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from sysbackup_local.template import HttpRoute, TemplateError, parse_template

REPO = Path(__file__).resolve().parents[3]

SMALL_TEMPLATE = textwrap.dedent(
    """
    Transform: AWS::Serverless-2016-10-31
    Parameters:
      PackageName: {Type: String, Default: pkg}
      DaysRetained: {Type: Number, Default: 7}
    Globals:
      Function:
        Timeout: 20
        Environment:
          Variables:
            BUCKET_NAME: !Ref Bucket
            TABLE: !Ref Things
            DAYS: !Ref DaysRetained
            ROLE: !Sub "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/${PackageName}-restore"
    Resources:
      BackupBucket:
        Type: AWS::S3::Bucket
        Properties:
          BucketName: !Sub "${PackageName}-${AWS::AccountId}-${AWS::Region}"
          ObjectLockEnabled: true
          ObjectLockConfiguration:
            Rule: {DefaultRetention: {Mode: GOVERNANCE, Days: !Ref DaysRetained}}
      Things:
        Type: AWS::DynamoDB::Table
        Properties:
          AttributeDefinitions:
            - {AttributeName: id, AttributeType: S}
            - {AttributeName: owner, AttributeType: S}
          KeySchema: [{AttributeName: id, KeyType: HASH}]
          TimeToLiveSpecification: {AttributeName: expires_at, Enabled: true}
          GlobalSecondaryIndexes:
            - IndexName: ByOwner
              KeySchema: [{AttributeName: owner, KeyType: HASH}, {AttributeName: id, KeyType: RANGE}]
              Projection: {ProjectionType: ALL}
      Landed:
        Type: AWS::SQS::Queue
        Properties:
          VisibilityTimeout: 60
          RedrivePolicy: {deadLetterTargetArn: !GetAtt Dead.Arn, maxReceiveCount: 3}
      Dead:
        Type: AWS::SQS::Queue
      ApiFunction:
        Type: AWS::Serverless::Function
        Properties:
          CodeUri: functions/api/
          MemorySize: 256
          Environment: {Variables: {POWERTOOLS_SERVICE_NAME: api}}
          Events:
            One: {Type: HttpApi, Properties: {Path: "/things/{thing_id}", Method: get}}
            Two: {Type: HttpApi, Properties: {Path: /things, Method: POST}}
      WorkerFunction:
        Type: AWS::Serverless::Function
        Properties:
          CodeUri: functions/worker
          Timeout: 300
          Events:
            Q:
              Type: SQS
              Properties:
                Queue: !GetAtt Landed.Arn
                BatchSize: 4
                FunctionResponseTypes: [ReportBatchItemFailures]
    """
)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "template.yaml"
    path.write_text(SMALL_TEMPLATE)
    return path


def test_intrinsics_resolve_to_local_names_and_parameter_defaults(small: Path) -> None:
    template = parse_template(small)

    assert template.bucket.name == "pkg-000000000000-us-east-1"
    assert template.bucket.default_lock_mode == "GOVERNANCE"
    assert template.bucket.default_lock_days == 7
    api = template.function("ApiFunction")
    assert api.environment["TABLE"] == "pkg-Things"
    assert api.environment["DAYS"] == "7"
    assert api.environment["ROLE"] == "arn:aws:iam::000000000000:role/pkg-restore"
    assert api.environment["POWERTOOLS_SERVICE_NAME"] == "api"
    assert (api.timeout_seconds, api.memory_mb) == (20, 256)


def test_parameter_overrides_replace_defaults(small: Path) -> None:
    template = parse_template(small, overrides={"PackageName": "other", "DaysRetained": "9"})

    assert template.bucket.name == "other-000000000000-us-east-1"
    assert template.function("api").environment["DAYS"] == "9"


def test_tables_queues_and_triggers(small: Path) -> None:
    template = parse_template(small)

    things = template.tables["Things"]
    assert things.key_schema == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert things.ttl_attribute == "expires_at"
    assert things.global_secondary_indexes == [
        {
            "IndexName": "ByOwner",
            "KeySchema": [
                {"AttributeName": "owner", "KeyType": "HASH"},
                {"AttributeName": "id", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        }
    ]
    landed = template.queues["Landed"]
    assert (landed.visibility_timeout, landed.dead_letter_logical_id, landed.max_receive_count) == (
        60,
        "Dead",
        3,
    )
    [trigger] = template.function("worker").sqs_triggers
    assert (trigger.queue_logical_id, trigger.batch_size, trigger.report_batch_item_failures) == (
        "Landed",
        4,
        True,
    )


def test_functions_are_found_by_logical_id_or_folder(small: Path) -> None:
    template = parse_template(small)

    assert template.function("worker") is template.function("WorkerFunction")
    assert set(template.function("api").routes) == {
        HttpRoute("GET", "/things/{thing_id}"),
        HttpRoute("POST", "/things"),
    }
    with pytest.raises(TemplateError, match="no function 'nope'"):
        template.function("nope")


def test_something_that_is_not_a_template_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "template.yaml"
    path.write_text("just: text\n")

    with pytest.raises(TemplateError):
        parse_template(path)


def test_the_real_template_declares_the_architecture_routes() -> None:
    """docs/ARCHITECTURE.md's function table, as the gateway will serve it."""
    template = parse_template(REPO / "template.yaml")

    served = {route.route_key: function for route, function in template.routes()}

    assert served["POST /packs/presign"] == "UploadApiFunction"
    assert served["GET /manifests/{manifest_id}"] == "ManifestApiFunction"
    assert served["GET /jobs/{job_id}"] == "ManifestApiFunction"
    assert served["GET /packs"] == "RestoreApiFunction"
    assert served["POST /downloads"] == "RestoreApiFunction"
    assert not {"POST /blobs/check", "POST /packs/register", "POST /packs/adopt"} & set(served)
    assert template.function("verify_pack").sqs_triggers[0].queue_logical_id == "VerifyQueue"
    # The commit learns the verify queue's URL as the stack resolves `!Ref VerifyQueue`.
    assert (
        template.function("manifest_api").environment["VERIFY_QUEUE_URL"]
        == template.queues["VerifyQueue"].name
    )


def test_the_real_template_gives_the_pack_registry_its_by_host_index() -> None:
    template = parse_template(REPO / "template.yaml")

    (index,) = template.tables["BlobIndexTable"].global_secondary_indexes
    assert index["IndexName"] == "ByHost"
    assert [key["AttributeName"] for key in index["KeySchema"]] == ["host", "pk"]
    assert {"AttributeName": "host", "AttributeType": "S"} in template.tables[
        "BlobIndexTable"
    ].attribute_definitions
