"""`s3-sysbackup admin ...`: operations run with administrator credentials (boto3), not a host's."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from ..provision.aws import ProvisionError, boto3_session
from ..provision.exports import BUCKET_EXPORT, add_package_options, read_exports, validate_package_name
from .common import report_failure

if TYPE_CHECKING:
    from ..provision.rebuild_index import RebuildReport

BLOB_INDEX_LOGICAL_ID = "BlobIndexTable"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "admin",
        help="administrator operations (admin AWS credentials)",
        description="Operations on a package's backend with administrator credentials.",
    )
    commands = parser.add_subparsers(dest="admin_command", metavar="ADMIN_COMMAND")
    commands.required = True
    rebuild = commands.add_parser(
        "rebuild-index",
        help="rebuild the pack registry from the bucket (packs and manifests)",
        description=(
            "List packs/ in the bucket, read each pack's trailer with ranged GETs (with --verify: read "
            "each pack whole and re-hash every blob) and its lock, walk every manifest's trees through "
            "the trailers to find which hosts use which packs, and write the registry's pack items "
            "again (presigned, or verified with --verify)."
        ),
    )
    add_package_options(rebuild)
    rebuild.add_argument("--bucket", help="the bucket (default: the <package>-BucketName export)")
    rebuild.add_argument("--table", help="the BlobIndexTable name (default: from the package's stack)")
    rebuild.add_argument(
        "--verify", action="store_true", help="read whole packs and re-hash every blob (marks them verified)"
    )
    rebuild.set_defaults(handler=run_rebuild_index)


def run_rebuild_index(args: argparse.Namespace) -> int:
    # Imported here: the backend's registry code is needed by this command only.
    from sysbackup_backend.registry import PackRegistry

    from ..provision.rebuild_index import rebuild_index

    try:
        package = validate_package_name(args.package)
        session = boto3_session(args.region, args.profile)
        bucket = args.bucket or read_exports(session.client("cloudformation"), package).require(BUCKET_EXPORT)
        table = args.table or blob_index_table(session.client("cloudformation"), package)
        registry = PackRegistry(table, session.resource("dynamodb").meta.client)
        report = rebuild_index(
            session.client("s3"),
            bucket,
            registry,
            verify=args.verify,
            progress=lambda line: print(line, file=sys.stderr),
        )
    except (BotoCoreError, ClientError, OSError, ProvisionError) as error:
        return report_failure("admin rebuild-index", error)
    print_rebuild_report(report, args.verify)
    return 1 if report.failed else 0


def print_rebuild_report(report: RebuildReport, verified: bool) -> None:
    print(
        f"{report.packs_recorded} packs recorded ({report.packs_verified} verified"
        f"{'' if verified else ', trailers trusted: run --verify to verify them'}), "
        f"{report.manifests_read} manifests walked, {len(report.hosts)} hosts, "
        f"{len(report.unreached)} unreached, {len(report.corrupt)} corrupt, {len(report.skipped)} skipped, "
        f"{report.bytes_read} bytes read"
    )
    for host, packs in sorted(report.hosts.items()):
        print(f"host {host}: {packs} packs")
    for pack_id, hosts in sorted(report.uncertain.items()):
        print(f"uncertain {pack_id}: given to {', '.join(hosts)} (it holds blobs only other hosts reach)")
    for pack_id, reason in sorted(report.corrupt.items()):
        print(f"corrupt {pack_id}: {reason}")
    for node, reason in sorted(report.missing_nodes.items()):
        print(f"unreadable node {node}: {reason}")
    for key, why in sorted(report.skipped.items()):
        print(f"skipped {key}: {why}")


def blob_index_table(cloudformation: Any, package: str) -> str:
    """The physical name CloudFormation gave the package's BlobIndexTable."""
    try:
        resource = cloudformation.describe_stack_resource(
            StackName=package, LogicalResourceId=BLOB_INDEX_LOGICAL_ID
        )
    except (BotoCoreError, ClientError) as error:
        raise ProvisionError(
            f"cannot find {BLOB_INDEX_LOGICAL_ID} in stack {package!r} (pass --table): {error}"
        ) from error
    return str(resource["StackResourceDetail"]["PhysicalResourceId"])
