"""template.yaml keeps the promises of docs/ARCHITECTURE.md and ../shared/DESIGN.md.

The SAM template is translated offline to plain CloudFormation with aws-sam-translator (a stub
managed-policy map, a region given to a local boto3 Session, no AWS call), so the assertions see the
roles, permissions and API definition SAM would deploy, not just what the template says.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from cfnlint.api import ManualArgs, lint_file
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator
from samtranslator.yaml_helper import yaml_parse

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT / "template.yaml"
ARCHITECTURE_PATH = REPO_ROOT / "docs" / "ARCHITECTURE.md"

# What SAM attaches by name; the real map would come from IAM (ListPolicies), which this test never calls.
MANAGED_POLICY_STUB = {
    "AWSLambdaBasicExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "AWSXrayWriteOnlyAccess": "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    "AWSLambdaSQSQueueExecutionRole": "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole",
}
# Managed policies a function role may carry: logs, X-Ray and the SQS poller. None grants S3/KMS/DynamoDB.
ALLOWED_FUNCTION_MANAGED_POLICIES = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole",
}
FUNCTIONS = (
    "UploadApiFunction",
    "ManifestApiFunction",
    "RestoreApiFunction",
    "VerifyPackFunction",
    "ExtendRetentionFunction",
    "GcFunction",
    "StaleHostsFunction",  # its IAM/SNS grants and schedule: tests/unit/test_template_ops.py
)
BY_HOST_KEYS = [("host", "HASH"), ("pk", "RANGE")]
TABLE_KEYS = {
    "BlobIndexTable": [("pk", "HASH"), ("sk", "RANGE")],
    "ManifestTable": [("host", "HASH"), ("manifest_id", "RANGE")],
    "JobsTable": [("job_id", "HASH")],
}
PACKS = "${BackupBucket.Arn}/packs/*"
MANIFESTS = "${BackupBucket.Arn}/manifests/*"
DATA_SERVICES = ("s3:", "kms:", "dynamodb:")


# ---------------------------------------------------------------- loading


def load_sam_template() -> dict[str, Any]:
    return yaml_parse(TEMPLATE_PATH.read_text())


def with_s3_code_locations(template: dict[str, Any]) -> dict[str, Any]:
    """Local CodeUri/ContentUri as `sam package` would rewrite them: the translator only takes s3:// URIs."""
    packaged = copy.deepcopy(template)
    for resource in packaged["Resources"].values():
        properties = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if isinstance(properties.get(key), str):
                properties[key] = f"s3://packaged-artifacts/{properties[key].strip('/')}"
    return packaged


def translate(template: dict[str, Any]) -> dict[str, Any]:
    translator = Translator(
        MANAGED_POLICY_STUB, Parser(), boto_session=boto3.Session(region_name="us-east-1")
    )
    return translator.translate(with_s3_code_locations(template), parameter_values={})


@pytest.fixture(scope="module")
def sam_template() -> dict[str, Any]:
    return load_sam_template()


@pytest.fixture(scope="module")
def cfn(sam_template: dict[str, Any]) -> dict[str, Any]:
    """The template as CloudFormation sees it after the Serverless transform."""
    return translate(sam_template)


@pytest.fixture(scope="module")
def resources(cfn: dict[str, Any]) -> dict[str, Any]:
    return cfn["Resources"]


# ---------------------------------------------------------------- policy helpers


def render(value: Any) -> str:
    """An intrinsic as one comparable string: GetAtt X.Arn -> `${X.Arn}`, Ref X -> `${X}`, Sub -> its text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((function, argument),) = value.items()
        if function == "Ref":
            return f"${{{argument}}}"
        if function == "Fn::GetAtt":
            return "${" + ".".join(argument if isinstance(argument, list) else [argument]) + "}"
        if function == "Fn::Sub":
            return argument if isinstance(argument, str) else argument[0]
    raise AssertionError(f"cannot render {value!r}")


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    return as_list(document["Statement"])


def actions(statement: dict[str, Any]) -> list[str]:
    return [action.lower() for action in as_list(statement.get("Action", []))]


def rendered_resources(statement: dict[str, Any]) -> list[str]:
    return [render(resource) for resource in as_list(statement.get("Resource", []))]


def role_statements(role: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for policy in role["Properties"].get("Policies", []):
        yield from statements(policy["PolicyDocument"])


def statement_by_sid(document: dict[str, Any], sid: str) -> dict[str, Any]:
    found = [statement for statement in statements(document) if statement.get("Sid") == sid]
    assert len(found) == 1, f"expected one statement {sid}, found {len(found)}"
    return found[0]


def allowed(role: dict[str, Any], action_prefix: str) -> dict[str, set[str]]:
    """action -> resources it is allowed on, for the actions of one service in a role's inline policies."""
    grants: dict[str, set[str]] = {}
    for statement in role_statements(role):
        if statement["Effect"] != "Allow":
            continue
        for action in actions(statement):
            if action.startswith(action_prefix):
                grants.setdefault(action, set()).update(rendered_resources(statement))
    return grants


def function_role(resources: dict[str, Any], function: str) -> dict[str, Any]:
    role_reference = resources[function]["Properties"]["Role"]
    return resources[render(role_reference).removeprefix("${").removesuffix(".Arn}")]


# ---------------------------------------------------------------- bucket


def test_bucket_has_object_lock_with_the_stacks_default_retention(resources: dict[str, Any]) -> None:
    bucket = resources["BackupBucket"]["Properties"]
    assert bucket["ObjectLockEnabled"] is True
    lock = bucket["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"
    retention = lock["Rule"]["DefaultRetention"]
    assert retention == {"Mode": {"Ref": "LockMode"}, "Days": {"Ref": "DaysRetained"}}


def test_lock_parameters_offer_only_the_two_lock_modes(sam_template: dict[str, Any]) -> None:
    parameters = sam_template["Parameters"]
    assert set(parameters["LockMode"]["AllowedValues"]) == {"GOVERNANCE", "COMPLIANCE"}
    assert parameters["LockMode"]["Default"] == "GOVERNANCE"
    assert int(parameters["DaysRetained"]["Default"]) == 30
    assert int(parameters["MaxDaysRetained"]["Default"]) == 3650
    assert int(parameters["DaysRetained"]["MinValue"]) >= 1


def test_bucket_is_versioned_and_retained(resources: dict[str, Any]) -> None:
    bucket = resources["BackupBucket"]
    assert bucket["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}
    assert bucket["DeletionPolicy"] == "Retain"
    assert bucket["UpdateReplacePolicy"] == "Retain"


def test_bucket_is_encrypted_with_the_rotating_customer_key(resources: dict[str, Any]) -> None:
    (rule,) = resources["BackupBucket"]["Properties"]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    assert render(rule["ServerSideEncryptionByDefault"]["KMSMasterKeyID"]) == "${BackupKey.Arn}"
    assert rule["BucketKeyEnabled"] is True
    key = resources["BackupKey"]
    assert key["Type"] == "AWS::KMS::Key"
    assert key["Properties"]["EnableKeyRotation"] is True
    assert key["DeletionPolicy"] == "Retain"


def test_key_is_used_only_through_s3_and_never_by_hosts(resources: dict[str, Any]) -> None:
    policy = resources["BackupKey"]["Properties"]["KeyPolicy"]
    use = statement_by_sid(policy, "UseOnlyThroughS3")
    assert {"kms:decrypt", "kms:generatedatakey*"} <= set(actions(use))
    assert render(use["Condition"]["StringEquals"]["kms:ViaService"]) == "s3.${AWS::Region}.amazonaws.com"
    # Only the admin statement may grant non-usage actions without the S3 condition.
    for statement in statements(policy):
        if statement["Effect"] == "Allow" and statement.get("Sid") != "UseOnlyThroughS3":
            assert not {"kms:decrypt", "kms:encrypt", "kms:generatedatakey*"} & set(actions(statement))
    hosts = statement_by_sid(policy, "HostsNever")
    assert hosts["Effect"] == "Deny"
    assert actions(hosts) == ["kms:*"]
    assert render(hosts["Condition"]["ArnEquals"]["aws:PrincipalArn"]) == "${HostRole.Arn}"


def test_public_access_is_fully_blocked_and_acls_disabled(resources: dict[str, Any]) -> None:
    bucket = resources["BackupBucket"]["Properties"]
    assert bucket["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert bucket["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}


def test_the_bucket_sends_no_notifications(resources: dict[str, Any]) -> None:
    """Verification is asked for by the commit (VerifyQueue), not per landed pack: no message per PUT."""
    bucket = resources["BackupBucket"]
    assert "NotificationConfiguration" not in bucket["Properties"]
    assert not [r for r in resources.values() if r["Type"] == "AWS::SQS::QueuePolicy"]


@pytest.mark.parametrize("queue", ["VerifyQueue", "RetentionQueue"])
def test_queues_are_encrypted_and_redrive_to_the_dead_letter_queue(
    resources: dict[str, Any], queue: str
) -> None:
    properties = resources[queue]["Properties"]
    dead_letter_id = (
        render(properties["RedrivePolicy"]["deadLetterTargetArn"]).strip("${}").removesuffix(".Arn")
    )
    dead_letters = resources[dead_letter_id]["Properties"]
    assert dead_letter_id == queue.removesuffix("Queue") + "DeadLetterQueue"
    assert properties["SqsManagedSseEnabled"] is True
    assert dead_letters["SqsManagedSseEnabled"] is True
    assert 3 <= properties["RedrivePolicy"]["maxReceiveCount"] <= 10
    assert dead_letters["MessageRetentionPeriod"] == 1209600


# ---------------------------------------------------------------- bucket policy


@pytest.fixture(scope="module")
def bucket_policy(resources: dict[str, Any]) -> dict[str, Any]:
    policy = resources["BackupBucketPolicy"]["Properties"]
    assert render(policy["Bucket"]) == "${BackupBucket}"
    return policy["PolicyDocument"]


def locked_put_denies(bucket_policy: dict[str, Any]) -> list[dict[str, Any]]:
    """Denies of PutObject that cover both packs and manifests, for everyone."""
    return [
        statement
        for statement in statements(bucket_policy)
        if statement["Effect"] == "Deny"
        and actions(statement) == ["s3:putobject"]
        and set(rendered_resources(statement)) == {PACKS, MANIFESTS}
        and statement["Principal"] == "*"
    ]


def deny_conditions(bucket_policy: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(operator, key) -> value over every deny of pack and manifest PUTs."""
    found = {}
    for statement in locked_put_denies(bucket_policy):
        for operator, condition in statement["Condition"].items():
            for key, value in condition.items():
                found[(operator, key)] = render(value)
    return found


def test_bucket_refuses_plain_http(bucket_policy: dict[str, Any]) -> None:
    statement = statement_by_sid(bucket_policy, "DenyInsecureTransport")
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == "*"
    assert actions(statement) == ["s3:*"]
    assert set(rendered_resources(statement)) == {"${BackupBucket.Arn}", "${BackupBucket.Arn}/*"}
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_put_must_use_the_stacks_lock_mode(bucket_policy: dict[str, Any]) -> None:
    assert deny_conditions(bucket_policy)[("StringNotEquals", "s3:object-lock-mode")] == "${LockMode}"


def test_put_must_carry_a_retain_until_date(bucket_policy: dict[str, Any]) -> None:
    assert deny_conditions(bucket_policy)[("Null", "s3:object-lock-retain-until-date")] == "true"


def test_put_may_not_lock_beyond_the_maximum(bucket_policy: dict[str, Any]) -> None:
    conditions = deny_conditions(bucket_policy)
    assert (
        conditions[("NumericGreaterThan", "s3:object-lock-remaining-retention-days")] == "${MaxDaysRetained}"
    )


def test_put_must_be_conditional_so_retries_never_add_versions(bucket_policy: dict[str, Any]) -> None:
    assert deny_conditions(bucket_policy)[("Null", "s3:if-none-match")] == "true"


def test_checksum_enforcement_is_documented_where_no_condition_key_exists() -> None:
    """No IAM key exists for x-amz-checksum-*; the template must say where the checksum is enforced."""
    text = TEMPLATE_PATH.read_text()
    assert "x-amz-checksum-sha256" in text
    assert re.search(r"checksum is enforced .*presigned URL", text, re.DOTALL)


def test_only_the_gc_role_may_bypass_governance(
    bucket_policy: dict[str, Any], resources: dict[str, Any]
) -> None:
    statement = statement_by_sid(bucket_policy, "OnlyGcBypassesGovernance")
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == "*"
    assert actions(statement) == ["s3:bypassgovernanceretention"]
    assert "${BackupBucket.Arn}/*" in rendered_resources(statement)
    assert statement["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": {"Fn::GetAtt": ["GcRole", "Arn"]}}}
    # ...and among the roles the stack creates, only GcRole is granted it in the first place.
    granted_to = {
        logical_id
        for logical_id, resource in resources.items()
        if resource["Type"] == "AWS::IAM::Role" and "s3:bypassgovernanceretention" in allowed(resource, "s3:")
    }
    assert granted_to == {"GcRole"}


def test_gc_role_can_expire_lapsed_versions(resources: dict[str, Any]) -> None:
    gc = resources["GcRole"]
    trust = statements(gc["Properties"]["AssumeRolePolicyDocument"])
    assert [statement["Principal"] for statement in trust] == [{"Service": "lambda.amazonaws.com"}]
    grants = allowed(gc, "s3:")
    assert grants["s3:listbucketversions"] == {"${BackupBucket.Arn}"}
    for action in (
        "s3:bypassgovernanceretention",
        "s3:deleteobjectversion",
        "s3:getobjectretention",
        "s3:putobjectretention",
    ):
        assert grants[action] == {"${BackupBucket.Arn}/*"}


# ---------------------------------------------------------------- tables


@pytest.mark.parametrize("logical_id", sorted(TABLE_KEYS))
def test_table_is_retained_recoverable_encrypted_and_on_demand(
    resources: dict[str, Any], logical_id: str
) -> None:
    table = resources[logical_id]
    assert table["DeletionPolicy"] == "Retain"
    assert table["UpdateReplacePolicy"] == "Retain"
    properties = table["Properties"]
    assert properties["BillingMode"] == "PAY_PER_REQUEST"
    assert properties["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert properties["SSESpecification"]["SSEEnabled"] is True


@pytest.mark.parametrize(("logical_id", "keys"), sorted(TABLE_KEYS.items()))
def test_table_keys_follow_the_contract(resources: dict[str, Any], logical_id: str, keys: list[Any]) -> None:
    properties = resources[logical_id]["Properties"]
    assert [(key["AttributeName"], key["KeyType"]) for key in properties["KeySchema"]] == keys
    index_keys = [
        (key["AttributeName"], key["KeyType"])
        for index in properties.get("GlobalSecondaryIndexes", [])
        for key in index["KeySchema"]
    ]
    assert {(a["AttributeName"], a["AttributeType"]) for a in properties["AttributeDefinitions"]} == {
        (name, "S") for name, _ in keys + index_keys
    }


def test_pack_registry_lists_a_hosts_packs_through_by_host(resources: dict[str, Any]) -> None:
    (index,) = resources["BlobIndexTable"]["Properties"]["GlobalSecondaryIndexes"]
    assert index["IndexName"] == "ByHost"
    assert [(key["AttributeName"], key["KeyType"]) for key in index["KeySchema"]] == BY_HOST_KEYS
    assert index["Projection"] == {"ProjectionType": "ALL"}  # list_host returns whole PackRecords
    assert "ProvisionedThroughput" not in index  # on demand, like the table


def test_jobs_expire_through_ttl(resources: dict[str, Any]) -> None:
    ttl = resources["JobsTable"]["Properties"]["TimeToLiveSpecification"]
    assert ttl == {"AttributeName": "expires_at", "Enabled": True}


# ---------------------------------------------------------------- functions


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_is_traced_layered_and_on_the_lambda_platform(
    resources: dict[str, Any], function: str
) -> None:
    properties = resources[function]["Properties"]
    assert properties["TracingConfig"] == {"Mode": "Active"}
    assert properties["Runtime"] == "python3.12"
    assert properties["Architectures"] == ["x86_64"]
    assert properties["Handler"] == "app.lambda_handler"
    layers = [render(layer) for layer in properties["Layers"]]
    shared = [logical_id for logical_id, r in resources.items() if r["Type"] == "AWS::Lambda::LayerVersion"]
    assert layers == [f"${{{layer}}}" for layer in shared]


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_logs_to_a_group_with_retention(resources: dict[str, Any], function: str) -> None:
    log_group_ref = resources[function]["Properties"]["LoggingConfig"]["LogGroup"]
    log_group = resources[render(log_group_ref).strip("${}")]
    assert log_group["Type"] == "AWS::Logs::LogGroup"
    assert log_group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_the_per_function_tests_cover_every_lambda_in_the_stack(resources: dict[str, Any]) -> None:
    functions = [logical_id for logical_id, r in resources.items() if r["Type"] == "AWS::Lambda::Function"]
    assert sorted(functions) == sorted(FUNCTIONS)


def documented_env_vars() -> dict[str, str]:
    """env var -> logical id, from the "Template logical ids -> environment variables" table."""
    rows = re.findall(r"^\|[^|]*\|\s*`(\w+)`\s*\|\s*`([A-Z_]+)`\s*\|$", ARCHITECTURE_PATH.read_text(), re.M)
    assert rows, "the environment variable table in docs/ARCHITECTURE.md was not found"
    return {env_var: logical_id for logical_id, env_var in rows}


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_environment_names_the_contract_resources(resources: dict[str, Any], function: str) -> None:
    variables = resources[function]["Properties"]["Environment"]["Variables"]
    for env_var, logical_id in documented_env_vars().items():
        assert variables[env_var] == {"Ref": logical_id}
    for env_var, parameter in {
        "DAYS_RETAINED": "DaysRetained",
        "MAX_DAYS_RETAINED": "MaxDaysRetained",
        "LOCK_MODE": "LockMode",
        "UPLOAD_URL_EXPIRY_SECONDS": "UploadUrlExpirySeconds",
    }.items():
        assert variables[env_var] == {"Ref": parameter}
    assert variables["POWERTOOLS_SERVICE_NAME"]


def test_restore_principal_env_var_names_the_restore_role(resources: dict[str, Any]) -> None:
    role_name = render(resources["RestoreRole"]["Properties"]["RoleName"])
    for function in FUNCTIONS:
        arns = render(resources[function]["Properties"]["Environment"]["Variables"]["RESTORE_PRINCIPAL_ARNS"])
        assert arns == f"arn:${{AWS::Partition}}:iam::${{AWS::AccountId}}:role/{role_name}"


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_role_names_no_wildcard_for_data_services(resources: dict[str, Any], function: str) -> None:
    role = function_role(resources, function)
    # GcRole (a plain IAM role, not one SAM made) names its managed policies with ${AWS::Partition}.
    managed = {
        render(arn).replace("${AWS::Partition}", "aws") for arn in role["Properties"]["ManagedPolicyArns"]
    }
    assert managed <= ALLOWED_FUNCTION_MANAGED_POLICIES
    for statement in role_statements(role):
        if any(action.startswith(DATA_SERVICES) for action in actions(statement)):
            assert "*" not in rendered_resources(statement)
            assert not any(action.endswith(":*") for action in actions(statement))


EXPECTED_GRANTS: dict[str, dict[str, dict[str, set[str]]]] = {
    "UploadApiFunction": {
        "s3:": {
            "s3:putobject": {PACKS},
            "s3:putobjectretention": {PACKS},
            "s3:getobject": {PACKS},
        },
        "kms:": {"kms:generatedatakey": {"${BackupKey.Arn}"}, "kms:decrypt": {"${BackupKey.Arn}"}},
    },
    "ManifestApiFunction": {
        "s3:": {
            "s3:putobject": {MANIFESTS},
            "s3:putobjectretention": {MANIFESTS},
            "s3:getobject": {MANIFESTS, PACKS},
        },
        "kms:": {"kms:generatedatakey": {"${BackupKey.Arn}"}, "kms:decrypt": {"${BackupKey.Arn}"}},
    },
    "RestoreApiFunction": {
        "s3:": {"s3:getobject": {PACKS}},
        "kms:": {"kms:decrypt": {"${BackupKey.Arn}"}},
    },
    "VerifyPackFunction": {
        "s3:": {"s3:getobject": {PACKS}},
        "kms:": {"kms:decrypt": {"${BackupKey.Arn}"}},
    },
    "ExtendRetentionFunction": {
        "s3:": {"s3:putobjectretention": {PACKS}, "s3:getobjectretention": {PACKS}},
        "kms:": {},
    },
    "GcFunction": {
        "s3:": {
            "s3:listbucketversions": {"${BackupBucket.Arn}"},
            "s3:bypassgovernanceretention": {"${BackupBucket.Arn}/*"},
            "s3:deleteobjectversion": {"${BackupBucket.Arn}/*"},
            "s3:getobjectretention": {"${BackupBucket.Arn}/*"},
            "s3:putobjectretention": {"${BackupBucket.Arn}/*"},
            "s3:getobject": {MANIFESTS, PACKS},
            "s3:getobjectversion": {MANIFESTS, PACKS},
            "s3:putobject": {PACKS},
        },
        "kms:": {"kms:decrypt": {"${BackupKey.Arn}"}, "kms:generatedatakey": {"${BackupKey.Arn}"}},
    },
    "StaleHostsFunction": {"s3:": {}, "kms:": {}},
}
BY_HOST = "${BlobIndexTable.Arn}/index/ByHost"
EXPECTED_TABLES = {
    "UploadApiFunction": {"${BlobIndexTable.Arn}"},
    "ManifestApiFunction": {"${ManifestTable.Arn}", "${BlobIndexTable.Arn}", "${JobsTable.Arn}"},
    "RestoreApiFunction": {"${BlobIndexTable.Arn}", BY_HOST},
    "VerifyPackFunction": {"${BlobIndexTable.Arn}"},
    "ExtendRetentionFunction": {"${BlobIndexTable.Arn}"},
    "GcFunction": {"${ManifestTable.Arn}", "${BlobIndexTable.Arn}", "${JobsTable.Arn}"},
    "StaleHostsFunction": {"${ManifestTable.Arn}"},
}
DYNAMODB_READS = {"dynamodb:getitem", "dynamodb:batchgetitem", "dynamodb:query"}
# What each function does to the pack registry (docs/PACK_INDEX.md), and nothing more.
EXPECTED_REGISTRY_ACTIONS = {
    "UploadApiFunction": {
        "dynamodb:getitem",
        "dynamodb:batchgetitem",
        "dynamodb:putitem",
        "dynamodb:updateitem",
    },
    "ManifestApiFunction": {
        "dynamodb:getitem",
        "dynamodb:batchgetitem",
        "dynamodb:updateitem",
        "dynamodb:conditioncheckitem",
    },
    "RestoreApiFunction": {"dynamodb:getitem", "dynamodb:batchgetitem"},
    "VerifyPackFunction": {"dynamodb:getitem", "dynamodb:batchgetitem", "dynamodb:updateitem"},
    "ExtendRetentionFunction": {"dynamodb:getitem", "dynamodb:batchgetitem", "dynamodb:updateitem"},
}


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_s3_and_kms_grants_are_exactly_its_prefixes(
    resources: dict[str, Any], function: str
) -> None:
    role = function_role(resources, function)
    for prefix, expected in EXPECTED_GRANTS[function].items():
        assert allowed(role, prefix) == expected


@pytest.mark.parametrize("function", FUNCTIONS)
def test_function_dynamodb_grants_touch_only_its_tables(resources: dict[str, Any], function: str) -> None:
    grants = allowed(function_role(resources, function), "dynamodb:")
    assert grants, f"{function} has no DynamoDB access"
    assert set().union(*grants.values()) == EXPECTED_TABLES[function]
    if function != "GcFunction":  # only gc scans and deletes (forget, condemned items, its lease)
        assert "dynamodb:scan" not in grants and "dynamodb:deleteitem" not in grants


def test_restore_api_only_reads_the_index(resources: dict[str, Any]) -> None:
    assert set(allowed(function_role(resources, "RestoreApiFunction"), "dynamodb:")) <= DYNAMODB_READS


@pytest.mark.parametrize("function", sorted(EXPECTED_REGISTRY_ACTIONS))
def test_function_registry_grants_are_what_it_does(resources: dict[str, Any], function: str) -> None:
    grants = allowed(function_role(resources, function), "dynamodb:")
    on_registry = {action for action, targets in grants.items() if "${BlobIndexTable.Arn}" in targets}
    assert on_registry == EXPECTED_REGISTRY_ACTIONS[function]


def test_only_the_restore_api_queries_by_host(resources: dict[str, Any]) -> None:
    querying = {
        function
        for function in FUNCTIONS
        if BY_HOST in allowed(function_role(resources, function), "dynamodb:").get("dynamodb:query", set())
    }
    assert querying == {"RestoreApiFunction"}
    assert allowed(function_role(resources, "RestoreApiFunction"), "dynamodb:")["dynamodb:query"] == {BY_HOST}


def test_the_commit_sends_verification_requests_to_the_verify_queue(resources: dict[str, Any]) -> None:
    properties = resources["ManifestApiFunction"]["Properties"]
    assert properties["Environment"]["Variables"]["VERIFY_QUEUE_URL"] == {"Ref": "VerifyQueue"}
    sends = allowed(function_role(resources, "ManifestApiFunction"), "sqs:")["sqs:sendmessage"]
    assert sends == {"${VerifyQueue.Arn}", "${RetentionQueue.Arn}"}
    senders = {
        function
        for function in FUNCTIONS
        if "${VerifyQueue.Arn}"
        in allowed(function_role(resources, function), "sqs:").get("sqs:sendmessage", set())
    }
    assert senders == {"ManifestApiFunction"}


@pytest.mark.parametrize(
    ("queue", "function"),
    [("VerifyQueue", "VerifyPackFunction"), ("RetentionQueue", "ExtendRetentionFunction")],
)
def test_queue_workers_report_partial_batch_failures(
    resources: dict[str, Any], queue: str, function: str
) -> None:
    mappings = [
        r
        for r in resources.values()
        if r["Type"] == "AWS::Lambda::EventSourceMapping"
        and render(r["Properties"]["EventSourceArn"]) == f"${{{queue}.Arn}}"
    ]
    (mapping,) = mappings
    properties = mapping["Properties"]
    assert render(properties["FunctionName"]) == f"${{{function}}}"
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    # A message must stay invisible while the worker may still be working on it.
    timeout = resources[function]["Properties"]["Timeout"]
    assert resources[queue]["Properties"]["VisibilityTimeout"] >= 6 * timeout


# ---------------------------------------------------------------- API


def documented_routes() -> set[tuple[str, str]]:
    """(function logical id, "METHOD /path") from the Functions table of docs/ARCHITECTURE.md."""
    routes = set()
    for line in ARCHITECTURE_PATH.read_text().splitlines():
        row = re.match(r"^\|\s*`(\w+Function)`\s*\|", line)
        if row:
            for route in re.findall(r"`((?:GET|POST|PUT|DELETE|PATCH) /[^`]*)`", line):
                routes.add((row.group(1), route))
    assert routes, "no routes found in docs/ARCHITECTURE.md"
    return routes


def deployed_routes(resources: dict[str, Any]) -> set[tuple[str, str]]:
    """(function logical id, "METHOD /path") from the OpenAPI body SAM generates for the HTTP API."""
    routes = set()
    for path, operations in resources["HttpApi"]["Properties"]["Body"]["paths"].items():
        for method, operation in operations.items():
            uri = render(operation["x-amazon-apigateway-integration"]["uri"])
            (function,) = re.findall(r"\$\{(\w+)\.Arn\}", uri)
            routes.add((function, f"{method.upper()} {path}"))
    return routes


def test_routes_are_exactly_those_of_the_architecture(resources: dict[str, Any]) -> None:
    assert deployed_routes(resources) == documented_routes()


def test_api_requires_iam_signatures_on_every_route(
    sam_template: dict[str, Any], resources: dict[str, Any]
) -> None:
    assert sam_template["Resources"]["HttpApi"]["Properties"]["Auth"]["DefaultAuthorizer"] == "AWS_IAM"
    for operations in resources["HttpApi"]["Properties"]["Body"]["paths"].values():
        for operation in operations.values():
            assert operation["security"] == [{"AWS_IAM": []}]


def test_api_access_is_logged_with_retention(resources: dict[str, Any]) -> None:
    stages = [r for r in resources.values() if r["Type"] == "AWS::ApiGatewayV2::Stage"]
    (stage,) = stages
    destination = render(stage["Properties"]["AccessLogSettings"]["DestinationArn"])
    log_group = resources[destination.removeprefix("${").removesuffix(".Arn}")]
    assert log_group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert "$context.identity.userArn" in stage["Properties"]["AccessLogSettings"]["Format"]


# ---------------------------------------------------------------- hosts and restore


def policies_reaching(resources: dict[str, Any], kind: str, logical_id: str) -> list[dict[str, Any]]:
    """Every policy document that applies to a group or role: managed policies attached to it + inline."""
    documents = [
        resource["Properties"]["PolicyDocument"]
        for resource in resources.values()
        if resource["Type"] == "AWS::IAM::ManagedPolicy"
        and {"Ref": logical_id} in resource["Properties"].get(kind, [])
    ]
    documents += [
        policy["PolicyDocument"] for policy in resources[logical_id]["Properties"].get("Policies", [])
    ]
    return documents


@pytest.mark.parametrize(("kind", "logical_id"), [("Groups", "HostsGroup"), ("Roles", "HostRole")])
def test_hosts_may_only_invoke_the_api(resources: dict[str, Any], kind: str, logical_id: str) -> None:
    documents = policies_reaching(resources, kind, logical_id)
    assert documents
    assert not resources[logical_id]["Properties"].get("ManagedPolicyArns")
    invoke_resources = set()
    for document in documents:
        for statement in statements(document):
            assert statement["Effect"] == "Allow"
            for action in actions(statement):
                assert not action.startswith(DATA_SERVICES), f"hosts hold {action}"
                if action == "execute-api:invoke":
                    invoke_resources.update(rendered_resources(statement))
                else:
                    # The one other thing a host user may do: take the host role under its own name.
                    assert action == "sts:assumerole"
                    assert rendered_resources(statement) == ["${HostRole.Arn}"]
    assert invoke_resources == {
        "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:${HttpApi}/*"
    }


def test_hosts_policy_is_attached_to_the_group_and_the_host_role(resources: dict[str, Any]) -> None:
    properties = resources["HostsPolicy"]["Properties"]
    assert properties["Groups"] == [{"Ref": "HostsGroup"}]
    assert properties["Roles"] == [{"Ref": "HostRole"}]
    (statement,) = statements(properties["PolicyDocument"])
    assert actions(statement) == ["execute-api:invoke"]


def test_host_role_session_name_is_pinned_to_the_user(resources: dict[str, Any]) -> None:
    (trust,) = statements(resources["HostRole"]["Properties"]["AssumeRolePolicyDocument"])
    assert actions(trust) == ["sts:assumerole"]
    assert trust["Condition"] == {"StringEquals": {"sts:RoleSessionName": "${aws:username}"}}


def test_restore_role_may_call_only_the_read_routes(resources: dict[str, Any]) -> None:
    role = resources["RestoreRole"]
    assert not role["Properties"].get("ManagedPolicyArns")
    granted = set()
    for statement in role_statements(role):
        assert actions(statement) == ["execute-api:invoke"]
        granted.update(rendered_resources(statement))
    prefix = "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:${HttpApi}/*/"
    assert granted == {
        prefix + "GET/manifests",
        prefix + "GET/manifests/*",
        prefix + "GET/jobs/*",
        prefix + "GET/packs",
        prefix + "POST/downloads",
    }


# ---------------------------------------------------------------- outputs, build, lint


def test_outputs_are_exported_under_the_package_name(cfn: dict[str, Any]) -> None:
    outputs = cfn["Outputs"]
    for name in ("BucketName", "ApiEndpoint", "HostsGroupName", "RestoreRoleArn"):
        assert render(outputs[name]["Export"]["Name"]).startswith("${PackageName}-")
    assert render(outputs["ApiEndpoint"]["Value"]).startswith("https://${HttpApi}.execute-api.")


def test_layer_is_built_by_its_makefile(sam_template: dict[str, Any]) -> None:
    layer = sam_template["Resources"]["SharedLayer"]
    assert layer["Metadata"]["BuildMethod"] == "makefile"
    makefile = (REPO_ROOT / layer["Properties"]["ContentUri"] / "Makefile").read_text()
    assert re.search(r"^build-SharedLayer:", makefile, re.M)
    for package in ("domain/sysbackup_domain", "backend/sysbackup_backend"):
        assert package in makefile
    assert "--python-version 3.12" in makefile and "manylinux2014_x86_64" in makefile


def lint_errors(path: Path) -> list[str]:
    matches = lint_file(path, ManualArgs(regions=["us-east-1"]))
    return [f"{match.rule.id} {match}" for match in matches if match.rule.id[0] in "EW"]


def test_cfn_lint_finds_no_errors_or_warnings() -> None:
    assert lint_errors(TEMPLATE_PATH) == []


def test_cfn_lint_would_catch_a_broken_template(tmp_path: Path) -> None:
    """Guards the test above: the same call does report a real mistake."""
    broken = tmp_path / "template.yaml"
    shutil.copy(TEMPLATE_PATH, broken)
    broken.write_text(
        broken.read_text().replace("BillingMode: PAY_PER_REQUEST", "BillingMode: PER_REQUEST", 1)
    )
    assert any(error.startswith("E") for error in lint_errors(broken))


def test_translation_runs_without_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The translation above is offline: it still works with no credentials or endpoints at all."""
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    assert "BackupBucket" in translate(load_sam_template())["Resources"]


def test_alarms_always_exist_and_watch_the_dead_letters(resources: dict[str, Any]) -> None:
    """Alarms are promised by default: no alarm, nor the topic, depends on AlarmEmail being set."""
    alarms = {logical_id: r for logical_id, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert alarms
    for logical_id, alarm in alarms.items():
        assert "Condition" not in alarm, f"{logical_id} exists only under {alarm['Condition']}"
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    watched = {
        render(dimension["Value"])
        for alarm in alarms.values()
        for dimension in alarm["Properties"]["Dimensions"]
    }
    assert "${VerifyDeadLetterQueue.QueueName}" in watched
    assert "${RetentionDeadLetterQueue.QueueName}" in watched
    assert "Condition" not in resources["AlarmTopic"]
    assert "Condition" not in resources["StaleHostsFunction"]
