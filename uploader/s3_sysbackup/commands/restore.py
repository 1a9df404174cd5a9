"""`s3-sysbackup restore MANIFEST|latest --target DIR [PATH...]`."""

from __future__ import annotations

import argparse
import sys

from ..fetch import BlobFetcher
from ..restorer import Restorer, resolve_manifest_id, write_snapshot
from .common import add_host_option, open_session, report_failure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "restore",
        help="restore a manifest into a directory",
        description=(
            "Restore MANIFEST (or `latest`) under --target, verifying every byte. PATHs (as backed up, "
            "e.g. /etc/ssh) restore only those subtrees. Exit status: 0 ok, 2 restored with warnings "
            "(owners, xattrs, devices not settable), 1 failed. With --snapshot NAME, the snapshot's stream "
            "goes to stdout instead."
        ),
    )
    parser.add_argument("manifest", metavar="MANIFEST", help="a manifest id, or `latest`")
    parser.add_argument("paths", metavar="PATH", nargs="*", help="restore only these backed-up paths")
    parser.add_argument("--target", help="directory to restore into (created if missing)")
    parser.add_argument(
        "--snapshot",
        metavar="NAME",
        help="write snapshot NAME's stream to stdout instead (pipe it to its restore-through command)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace files already in the target")
    add_host_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if (args.target is None) == (args.snapshot is None):
        return report_failure("restore", ValueError("give either --target DIR or --snapshot NAME"))
    try:
        session = open_session(args)
        manifest_id = resolve_manifest_id(session.api, args.manifest, args.host)
        manifest = session.api.get_manifest(manifest_id, host=args.host)
        fetcher = BlobFetcher(session.api, session.transfer, host=args.host)
        if args.snapshot is not None:
            write_snapshot(fetcher, manifest, args.snapshot, sys.stdout.buffer)
            return 0
        result = Restorer(fetcher, args.target, overwrite=args.overwrite).restore(manifest, args.paths)
    except (OSError, RuntimeError, ValueError) as error:
        return report_failure("restore", error)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{result.manifest_id}: restored {result.files} files, {result.dirs} directories, "
        f"{result.bytes_written} bytes into {args.target}"
    )
    return 2 if result.warnings else 0
