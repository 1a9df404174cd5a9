"""The names a package's stack exports (template.yaml Outputs) and reading them back.

Every export name embeds the package name (`<package>-BucketName`), so several packages coexist in one
region; write-config finds a package's bucket and API endpoint from them.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .aws import ProvisionError

DEFAULT_PACKAGE = "s3-sysbackup"
# template.yaml's PackageName AllowedPattern: it becomes part of the bucket and role names.
PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,29}[a-z0-9]$")

BUCKET_EXPORT = "BucketName"
API_ENDPOINT_EXPORT = "ApiEndpoint"
HOSTS_GROUP_EXPORT = "HostsGroup"
HOST_ROLE_EXPORT = "HostRoleArn"
RESTORE_ROLE_EXPORT = "RestoreRoleArn"


def add_package_options(parser: argparse.ArgumentParser, with_package: bool = True) -> None:
    """--package, --region and --profile: which package's stack, where, with which admin credentials."""
    if with_package:
        parser.add_argument(
            "--package", default=DEFAULT_PACKAGE, help=f"the package = its stack's name ({DEFAULT_PACKAGE})"
        )
    parser.add_argument("--region", help="the package's AWS region (default: your AWS profile's)")
    parser.add_argument("--profile", help="admin AWS profile to use (default: botocore's usual chain)")


def validate_package_name(package: str) -> str:
    if not PACKAGE_NAME.match(package):
        raise ProvisionError(
            f"package name {package!r} must be 2-31 lower-case letters, digits or hyphens, "
            "not starting or ending with a hyphen (it becomes part of the bucket name)"
        )
    return package


def export_name(package: str, suffix: str) -> str:
    return f"{package}-{suffix}"


@dataclass(frozen=True)
class PackageExports:
    """The exports of one package, by their suffix (`BucketName`, `ApiEndpoint`, ...)."""

    package: str
    values: dict[str, str]

    def require(self, suffix: str) -> str:
        value = self.values.get(suffix)
        if value is None:
            raise ProvisionError(
                f"CloudFormation has no export {export_name(self.package, suffix)!r} in this region "
                f"(is package {self.package!r} deployed here? run create-resources, or pass --region)"
            )
        return value


def read_exports(cloudformation: Any, package: str) -> PackageExports:
    """All exports named `<package>-...` in the client's region (ListExports pages through all stacks)."""
    prefix = export_name(package, "")
    values: dict[str, str] = {}
    try:
        for page in cloudformation.get_paginator("list_exports").paginate():
            for export in page.get("Exports", []):
                if export["Name"].startswith(prefix):
                    values[export["Name"].removeprefix(prefix)] = export["Value"]
    except (BotoCoreError, ClientError) as error:
        raise ProvisionError(f"cannot list CloudFormation exports: {error}") from error
    return PackageExports(package, values)


def stack_outputs(cloudformation: Any, stack_name: str) -> list[dict[str, str]]:
    """The stack's outputs (OutputKey, OutputValue, Description, ExportName), in template order."""
    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except (BotoCoreError, ClientError) as error:
        raise ProvisionError(f"cannot describe stack {stack_name!r}: {error}") from error
    if not stacks:
        raise ProvisionError(f"stack {stack_name!r} not found")
    return list(stacks[0].get("Outputs", []))
