"""`s3-sysbackup verify [MANIFEST|latest] [--read-data]`."""

from __future__ import annotations

import argparse

from ..restorer import resolve_manifest_id
from ..verify import verify_manifest
from .common import add_host_option, blob_fetcher, open_session, report_failure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check that a manifest is restorable",
        description=(
            "Check every blob MANIFEST (default: latest) references is stored; with --read-data, "
            "download and re-hash all of it. Exit status 0 if restorable, 1 if not."
        ),
    )
    parser.add_argument("manifest", metavar="MANIFEST", nargs="?", default="latest")
    parser.add_argument("--read-data", action="store_true", help="download and re-hash every blob")
    add_host_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        session = open_session(args)
        manifest_id = resolve_manifest_id(session.api, args.manifest, args.host)
        manifest = session.api.get_manifest(manifest_id, host=args.host)
        with blob_fetcher(session, args.host) as fetcher:
            report = verify_manifest(fetcher, manifest, args.read_data)
    except (OSError, RuntimeError, ValueError) as error:
        return report_failure("verify", error)
    for note in report.notes:
        print(f"note: {note}")
    checked = f"{report.bytes_verified} bytes re-hashed" if args.read_data else "all located"
    print(f"{report.manifest_id}: OK: {report.trees} trees, {report.blobs} content blobs, {checked}")
    return 0
