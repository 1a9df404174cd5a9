"""Fixtures and helpers for the provisioning tests (conftest.py registers the fixtures).

moto (in-process) stands in for CloudFormation, IAM, S3 and DynamoDB.

`deployed_package` creates, through moto's CloudFormation, a stack that exports what template.yaml exports
(`<package>-BucketName`, `-ApiEndpoint`, `-HostsGroup`, `-HostRoleArn`) and holds a real IAM group, so
write-config's lookups and user creation go through the same API calls as against AWS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pytest
from moto import mock_aws

REGION = "eu-west-1"
PACKAGE = "pkg-test"
API_ENDPOINT = "https://abc123.execute-api.eu-west-1.amazonaws.com"


@dataclass(frozen=True)
class DeployedPackage:
    package: str
    region: str
    bucket: str
    api_endpoint: str
    hosts_group: str
    host_role_arn: str
    restore_role_arn: str


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake admin credentials and an isolated moto account; no real config file is read."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    with mock_aws():
        yield


def package_stack_template(package: str) -> str:
    """A stand-in for template.yaml's IAM group and Outputs (moto cannot deploy the SAM application)."""
    bucket = f"{package}-123456789012-{REGION}"
    return json.dumps(
        {
            "Resources": {
                # The table rebuild-index finds through DescribeStackResource, as in the real stack.
                "BlobIndexTable": {
                    "Type": "AWS::DynamoDB::Table",
                    "Properties": {
                        "BillingMode": "PAY_PER_REQUEST",
                        "AttributeDefinitions": [
                            {"AttributeName": "pk", "AttributeType": "S"},
                            {"AttributeName": "sk", "AttributeType": "S"},
                        ],
                        "KeySchema": [
                            {"AttributeName": "pk", "KeyType": "HASH"},
                            {"AttributeName": "sk", "KeyType": "RANGE"},
                        ],
                    },
                },
            },
            "Outputs": {
                "BucketName": {"Value": bucket, "Export": {"Name": f"{package}-BucketName"}},
                "ApiEndpoint": {"Value": API_ENDPOINT, "Export": {"Name": f"{package}-ApiEndpoint"}},
                "HostsGroupName": {"Value": f"{package}-hosts", "Export": {"Name": f"{package}-HostsGroup"}},
                "HostRoleArn": {
                    "Value": f"arn:aws:iam::123456789012:role/{package}-host",
                    "Export": {"Name": f"{package}-HostRoleArn"},
                },
                "RestoreRoleArn": {
                    "Value": f"arn:aws:iam::123456789012:role/{package}-restore",
                    "Export": {"Name": f"{package}-RestoreRoleArn"},
                },
            },
        }
    )


def deploy_stand_in(package: str) -> DeployedPackage:
    # moto's CloudFormation cannot create IAM groups: made directly, exported by name as the stack does.
    boto3.client("iam").create_group(GroupName=f"{package}-hosts", Path=f"/{package}/")
    cloudformation = boto3.client("cloudformation", region_name=REGION)
    cloudformation.create_stack(StackName=package, TemplateBody=package_stack_template(package))
    return DeployedPackage(
        package=package,
        region=REGION,
        bucket=f"{package}-123456789012-{REGION}",
        api_endpoint=API_ENDPOINT,
        hosts_group=f"{package}-hosts",
        host_role_arn=f"arn:aws:iam::123456789012:role/{package}-host",
        restore_role_arn=f"arn:aws:iam::123456789012:role/{package}-restore",
    )


@pytest.fixture
def deployed_package(aws: None) -> DeployedPackage:
    return deploy_stand_in(PACKAGE)
