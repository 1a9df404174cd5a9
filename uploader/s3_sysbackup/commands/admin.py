"""`s3-sysbackup admin ...`: operations run with administrator credentials (boto3), not a host's."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ..provision.aws import ProvisionError, boto3_session
from ..provision.exports import BUCKET_EXPORT, add_package_options, read_exports, validate_package_name
from .common import report_failure

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
        help="rebuild the blob index from the packs' trailers",
        description=(
            "List packs/ in the bucket, read each pack's trailer with ranged GETs (with --verify: read "
            "each pack whole and re-hash every blob) and write the index's verified items again. "
            "Without --verify the trailers are trusted: use it only on a bucket no host could write."
        ),
    )
    add_package_options(rebuild)
    rebuild.add_argument("--bucket", help="the bucket (default: the <package>-BucketName export)")
    rebuild.add_argument("--table", help="the BlobIndexTable name (default: from the package's stack)")
    rebuild.add_argument("--verify", action="store_true", help="read whole packs and re-hash every blob")
    rebuild.set_defaults(handler=run_rebuild_index)


def run_rebuild_index(args: argparse.Namespace) -> int:
    # Imported here: the backend's index code is needed by this command only.
    from sysbackup_backend.index import BlobIndex

    from ..provision.rebuild_index import rebuild_index

    try:
        package = validate_package_name(args.package)
        session = boto3_session(args.region, args.profile)
        bucket = args.bucket or read_exports(session.client("cloudformation"), package).require(BUCKET_EXPORT)
        table = args.table or blob_index_table(session.client("cloudformation"), package)
        index = BlobIndex(table, session.resource("dynamodb").meta.client)
        report = rebuild_index(
            session.client("s3"),
            bucket,
            index,
            verify=args.verify,
            progress=lambda line: print(line, file=sys.stderr),
        )
    except (BotoCoreError, ClientError, OSError, ProvisionError) as error:
        return report_failure("admin rebuild-index", error)
    print(
        f"{report.packs_indexed} packs indexed ({'re-hashed' if args.verify else 'trailers trusted'}), "
        f"{report.blobs_indexed} blobs newly verified, {report.bytes_read} bytes read, "
        f"{len(report.corrupt)} corrupt, {len(report.skipped)} skipped"
    )
    for key, why in sorted(report.skipped.items()):
        print(f"skipped {key}: {why}")
    return 1 if report.corrupt else 0


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
