"""Reads what the local stack must create from `template.yaml`, so the two cannot drift.

Only the subset of CloudFormation the local stack needs is understood: parameter defaults, `!Ref`, `!Sub`,
`!GetAtt` on the resources the stack creates, the bucket, tables, queues and the functions with their
HttpApi and SQS events. Anything else resolves to a placeholder string rather than failing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ACCOUNT_ID = "000000000000"
REGION = "us-east-1"
PARTITION = "aws"


class TemplateError(ValueError):
    """template.yaml lacks something the local stack needs."""


class _CfnLoader(yaml.SafeLoader):
    """A YAML loader that turns CloudFormation short tags (`!Ref x`) into their long form (`{"Ref": x}`)."""


def _construct_tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if tag_suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _construct_tag)


def load_template_document(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as stream:
        document = yaml.load(stream, Loader=_CfnLoader)
    if not isinstance(document, dict) or "Resources" not in document:
        raise TemplateError(f"{path} is not a CloudFormation template (no Resources)")
    return document


@dataclass(frozen=True)
class HttpRoute:
    method: str
    path: str  # e.g. /manifests/{manifest_id}

    @property
    def route_key(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class SqsTrigger:
    queue_logical_id: str
    batch_size: int
    report_batch_item_failures: bool


@dataclass(frozen=True)
class FunctionSpec:
    logical_id: str
    folder: str  # functions/<folder>
    handler: str  # app.lambda_handler
    timeout_seconds: int
    memory_mb: int
    environment: dict[str, str]
    routes: tuple[HttpRoute, ...] = ()
    sqs_triggers: tuple[SqsTrigger, ...] = ()
    # The template's `Role: !GetAtt X.Arn` (e.g. GcRole), or None for the role SAM makes per function.
    role_logical_id: str | None = None


@dataclass(frozen=True)
class TableSpec:
    logical_id: str
    name: str
    key_schema: list[dict[str, str]]
    attribute_definitions: list[dict[str, str]]
    ttl_attribute: str | None
    # As CreateTable takes them (IndexName, KeySchema, Projection); on-demand tables need no throughput.
    global_secondary_indexes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class QueueSpec:
    logical_id: str
    name: str
    visibility_timeout: int
    dead_letter_logical_id: str | None
    max_receive_count: int | None


@dataclass(frozen=True)
class BucketSpec:
    logical_id: str
    name: str
    object_lock: bool
    default_lock_mode: str | None
    default_lock_days: int | None


@dataclass
class StackTemplate:
    """The resolved parts of template.yaml the local stack creates or runs."""

    parameters: dict[str, str]
    bucket: BucketSpec
    tables: dict[str, TableSpec]
    queues: dict[str, QueueSpec]
    functions: dict[str, FunctionSpec]
    restore_role_name: str
    resource_names: dict[str, str] = field(default_factory=dict)

    def function(self, name: str) -> FunctionSpec:
        """A function by logical id (`VerifyPackFunction`) or folder name (`verify_pack`)."""
        if name in self.functions:
            return self.functions[name]
        for spec in self.functions.values():
            if spec.folder == name:
                return spec
        known = ", ".join(sorted(self.functions))
        raise TemplateError(f"no function {name!r} in template.yaml (known: {known})")

    def routes(self) -> list[tuple[HttpRoute, str]]:
        return [(route, spec.logical_id) for spec in self.functions.values() for route in spec.routes]


class _Resolver:
    """Resolves intrinsic functions against parameter defaults and the local names of resources."""

    def __init__(self, parameters: dict[str, str], resource_names: dict[str, str]) -> None:
        self.parameters = parameters
        self.resource_names = resource_names

    def pseudo(self, name: str) -> str | None:
        return {
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::Region": REGION,
            "AWS::Partition": PARTITION,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": self.parameters.get("PackageName", "s3-sysbackup"),
        }.get(name)

    def ref(self, name: str) -> str:
        if name in self.parameters:
            return self.parameters[name]
        pseudo = self.pseudo(name)
        if pseudo is not None:
            return pseudo
        return self.resource_names.get(name, name)

    def get_att(self, logical_id: str, attribute: str) -> str:
        name = self.resource_names.get(logical_id, logical_id)
        if attribute == "Arn":
            return f"arn:{PARTITION}:local:{REGION}:{ACCOUNT_ID}:{name}"
        return name

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            [(key, argument)] = value.items()
            if key == "Ref":
                return self.ref(argument)
            if key == "Fn::Sub":
                return self._sub(argument)
            if key == "Fn::GetAtt":
                logical_id, attribute = argument if isinstance(argument, list) else argument.split(".", 1)
                return self.get_att(logical_id, attribute)
            if key == "Fn::Join":
                separator, items = argument
                return separator.join(str(self.resolve(item)) for item in items)
        return {key: self.resolve(item) for key, item in value.items()}

    def _sub(self, argument: Any) -> str:
        template, variables = (argument, {}) if isinstance(argument, str) else argument
        resolved_variables = {name: str(self.resolve(item)) for name, item in variables.items()}

        def replace(match: re.Match[str]) -> str:
            expression = match.group(1)
            if expression.startswith("!"):
                return "${" + expression[1:] + "}"
            if expression in resolved_variables:
                return resolved_variables[expression]
            if "." in expression and expression.split(".", 1)[0] not in self.parameters:
                logical_id, attribute = expression.split(".", 1)
                return self.get_att(logical_id, attribute)
            return str(self.ref(expression))

        return re.sub(r"\$\{([^}]+)\}", replace, template)


def _resources_of_type(resources: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {logical_id: body for logical_id, body in resources.items() if body.get("Type") == kind}


def _parameter_defaults(document: dict[str, Any]) -> dict[str, str]:
    return {
        name: str(body["Default"])
        for name, body in (document.get("Parameters") or {}).items()
        if "Default" in body
    }


def _local_resource_names(resources: dict[str, Any], package: str) -> dict[str, str]:
    """Names for resources whose template leaves the name to CloudFormation: `<package>-<LogicalId>`."""
    names: dict[str, str] = {}
    for logical_id, body in resources.items():
        if body.get("Type") in {"AWS::DynamoDB::Table", "AWS::SQS::Queue"}:
            names[logical_id] = f"{package}-{logical_id}"
    return names


def parse_template(path: Path, overrides: dict[str, str] | None = None) -> StackTemplate:
    """Reads template.yaml; `overrides` replace parameter defaults (as `sam deploy --parameter-overrides`)."""
    document = load_template_document(path)
    resources: dict[str, Any] = document["Resources"]
    parameters = _parameter_defaults(document) | (overrides or {})
    package = parameters.get("PackageName", "s3-sysbackup")
    resource_names = _local_resource_names(resources, package)
    resolver = _Resolver(parameters, resource_names)

    bucket = _parse_bucket(resources, resolver)
    resource_names[bucket.logical_id] = bucket.name
    # Queue URLs are what !Ref gives for a queue; the local stack passes names, which boto3 also accepts
    # only for some calls, so functions should not rely on them (none does today).
    tables = _parse_tables(resources, resolver)
    queues = _parse_queues(resources, resolver)
    functions = _parse_functions(document, resources, resolver)
    restore_role = resources.get("RestoreRole", {}).get("Properties", {})
    restore_role_name = str(resolver.resolve(restore_role.get("RoleName", "RestoreRole")))
    return StackTemplate(
        parameters=parameters,
        bucket=bucket,
        tables=tables,
        queues=queues,
        functions=functions,
        restore_role_name=restore_role_name,
        resource_names=resource_names,
    )


def _parse_bucket(resources: dict[str, Any], resolver: _Resolver) -> BucketSpec:
    buckets = _resources_of_type(resources, "AWS::S3::Bucket")
    if "BackupBucket" not in buckets:
        raise TemplateError("template.yaml declares no BackupBucket (AWS::S3::Bucket)")
    properties = resolver.resolve(buckets["BackupBucket"].get("Properties", {}))
    name = properties.get("BucketName") or f"{resolver.ref('PackageName')}-backupbucket"
    lock_rule = (properties.get("ObjectLockConfiguration") or {}).get("Rule", {}).get("DefaultRetention", {})
    return BucketSpec(
        logical_id="BackupBucket",
        name=str(name).lower(),
        object_lock=bool(properties.get("ObjectLockEnabled")),
        default_lock_mode=lock_rule.get("Mode"),
        default_lock_days=int(lock_rule["Days"]) if "Days" in lock_rule else None,
    )


def _logical_id_of_arn(arn: str) -> str:
    """Our placeholder ARNs end in the resource's local name `<package>-<LogicalId>`."""
    return str(arn).rsplit(":", 1)[-1].rsplit("-", 1)[-1]


def _parse_tables(resources: dict[str, Any], resolver: _Resolver) -> dict[str, TableSpec]:
    tables: dict[str, TableSpec] = {}
    for logical_id, body in _resources_of_type(resources, "AWS::DynamoDB::Table").items():
        properties = resolver.resolve(body.get("Properties", {}))
        ttl = properties.get("TimeToLiveSpecification") or {}
        tables[logical_id] = TableSpec(
            logical_id=logical_id,
            name=properties.get("TableName") or resolver.resource_names[logical_id],
            key_schema=properties["KeySchema"],
            attribute_definitions=properties["AttributeDefinitions"],
            ttl_attribute=ttl.get("AttributeName") if ttl.get("Enabled") else None,
            global_secondary_indexes=[
                {name: index[name] for name in ("IndexName", "KeySchema", "Projection")}
                for index in properties.get("GlobalSecondaryIndexes", [])
            ],
        )
    return tables


def _parse_queues(resources: dict[str, Any], resolver: _Resolver) -> dict[str, QueueSpec]:
    queues: dict[str, QueueSpec] = {}
    for logical_id, body in _resources_of_type(resources, "AWS::SQS::Queue").items():
        properties = resolver.resolve(body.get("Properties", {}))
        redrive = properties.get("RedrivePolicy") or {}
        queues[logical_id] = QueueSpec(
            logical_id=logical_id,
            name=properties.get("QueueName") or resolver.resource_names[logical_id],
            visibility_timeout=int(properties.get("VisibilityTimeout", 30)),
            dead_letter_logical_id=_logical_id_of_arn(redrive["deadLetterTargetArn"]) if redrive else None,
            max_receive_count=int(redrive["maxReceiveCount"]) if redrive else None,
        )
    return queues


def _parse_functions(
    document: dict[str, Any], resources: dict[str, Any], resolver: _Resolver
) -> dict[str, FunctionSpec]:
    globals_ = resolver.resolve((document.get("Globals") or {}).get("Function", {}))
    global_env = (globals_.get("Environment") or {}).get("Variables", {})
    functions: dict[str, FunctionSpec] = {}
    for logical_id, body in _resources_of_type(resources, "AWS::Serverless::Function").items():
        properties = resolver.resolve(body.get("Properties", {}))
        code_uri = str(properties.get("CodeUri", "")).rstrip("/")
        if not code_uri.startswith("functions/"):
            raise TemplateError(f"{logical_id}: CodeUri {code_uri!r} is not under functions/")
        environment = {
            name: str(value)
            for name, value in (
                global_env | (properties.get("Environment") or {}).get("Variables", {})
            ).items()
        }
        routes: list[HttpRoute] = []
        triggers: list[SqsTrigger] = []
        for event in (properties.get("Events") or {}).values():
            event_properties = event.get("Properties", {})
            if event.get("Type") == "HttpApi":
                routes.append(
                    HttpRoute(str(event_properties["Method"]).upper(), str(event_properties["Path"]))
                )
            elif event.get("Type") == "SQS":
                triggers.append(
                    SqsTrigger(
                        queue_logical_id=_logical_id_of_arn(event_properties["Queue"]),
                        batch_size=int(event_properties.get("BatchSize", 10)),
                        report_batch_item_failures="ReportBatchItemFailures"
                        in event_properties.get("FunctionResponseTypes", []),
                    )
                )
        functions[logical_id] = FunctionSpec(
            logical_id=logical_id,
            folder=code_uri.split("/", 1)[1],
            handler=str(properties.get("Handler", globals_.get("Handler", "app.lambda_handler"))),
            timeout_seconds=int(properties.get("Timeout", globals_.get("Timeout", 3))),
            memory_mb=int(properties.get("MemorySize", globals_.get("MemorySize", 128))),
            environment=environment,
            routes=tuple(routes),
            sqs_triggers=tuple(triggers),
            role_logical_id=_role_logical_id(body.get("Properties", {}).get("Role")),
        )
    return functions


def _role_logical_id(role: Any) -> str | None:
    """`!GetAtt GcRole.Arn` -> "GcRole"; anything else (absent, a literal ARN) -> None."""
    if isinstance(role, dict) and "Fn::GetAtt" in role:
        argument = role["Fn::GetAtt"]
        return str(argument[0] if isinstance(argument, list) else str(argument).split(".", 1)[0])
    return None
