"""`s3-sysbackup archive`: back this host up (pickers.d files, snapshots.d streams) and commit a manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..archiver import EXIT_FAILURE, ArchiveOptions, Archiver, write_stats_json
from .common import open_session, report_failure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "archive",
        help="back this host up and commit a manifest",
        description=(
            "Run pickers.d and snapshots.d, upload what the backend lacks, commit a manifest. "
            "Exit status: 0 ok, 2 committed with warnings (skipped files, failed pickers/snapshots), "
            "1 failed."
        ),
    )
    parser.add_argument("--stats-json", type=Path, metavar="FILE", help="write the run's figures to FILE")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line or summary")
    parser.add_argument(
        "--adopt-head",
        action="store_true",
        help="take the backend's latest manifest as parent (a cache reset by hand; a lost cache does so by "
        "itself; never on a clone)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        session = open_session(args)
        archiver = Archiver(
            session.config,
            session.api,
            session.transfer,
            ArchiveOptions(quiet=args.quiet, adopt_head=args.adopt_head),
        )
        result = archiver.run()
    except (OSError, RuntimeError, ValueError) as error:
        return report_failure("archive", error)
    if args.stats_json is not None:
        write_stats_json(args.stats_json, result.stats)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        stats = result.stats
        print(
            f"{result.manifest_id}: {stats['files']} files, {stats['bytes_read']} bytes read, "
            f"{stats['bytes_uploaded']} bytes uploaded in {stats['packs']} packs, "
            f"{len(result.warnings)} warnings, {stats['elapsed_s']} s"
        )
    return result.exit_code if result.manifest_id else EXIT_FAILURE
