"""`s3-sysbackup create-resources [--package NAME] [--region R] [--dry-run]`: sam build + sam deploy."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..provision.aws import ProvisionError, boto3_session
from ..provision.exports import add_package_options, stack_outputs, validate_package_name
from ..provision.sam import DeployPlan, find_sam, find_template, parse_parameters, run_step
from .common import report_failure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "create-resources",
        help="deploy the backend (SAM stack) into your AWS account",
        description=(
            "Build and deploy template.yaml with the AWS SAM CLI as stack NAME (the package), then print "
            "what it created. Exports are named <package>-BucketName, <package>-ApiEndpoint, ... so "
            "several packages can coexist in one region."
        ),
    )
    add_package_options(parser)
    parser.add_argument("--template", type=Path, help="SAM template (default: this checkout's template.yaml)")
    parser.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another template parameter, e.g. AlarmEmail=ops@example.com (repeatable)",
    )
    parser.add_argument("--confirm", action="store_true", help="show the change set and ask before deploying")
    parser.add_argument("--dry-run", action="store_true", help="print the sam commands, run nothing")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        plan = DeployPlan(
            template=find_template(args.template),
            package=validate_package_name(args.package),
            region=boto3_session(args.region, args.profile).region_name,
            parameters=parse_parameters(args.parameter),
            confirm_changeset=args.confirm,
        )
        if args.dry_run:
            sam = "sam"
            for command in (plan.build_command(sam), plan.deploy_command(sam)):
                print(shlex.join(command))
            return 0
        sam = find_sam()
        run_step(plan.build_command(sam), cwd=plan.template.parent)
        run_step(plan.deploy_command(sam), cwd=plan.template.parent)
        cloudformation = boto3_session(plan.region, args.profile).client("cloudformation")
        outputs = stack_outputs(cloudformation, plan.package)
    except (OSError, ProvisionError, ValueError) as error:
        return report_failure("create-resources", error)
    print_outputs(plan.package, plan.region, outputs)
    return 0


def print_outputs(package: str, region: str, outputs: list[dict[str, str]]) -> None:
    print(f"package {package} in {region}:")
    width = max((len(output["OutputKey"]) for output in outputs), default=0)
    for output in outputs:
        export = f"  (export {output['ExportName']})" if output.get("ExportName") else ""
        print(f"  {output['OutputKey']:<{width}}  {output['OutputValue']}{export}")
    if any(output["OutputKey"] == "AlarmTopicArn" for output in outputs):
        # SNS e-mail subscriptions deliver nothing until the address confirms them.
        print("alarms: confirm the subscription e-mail AWS sent to the AlarmEmail address")
    print(f"next: s3-sysbackup write-config --package {package} --region {region} --create-user HOSTNAME")
