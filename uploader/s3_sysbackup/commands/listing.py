"""`s3-sysbackup list`: this host's manifests (date, id, files, bytes, snapshots with their descriptions)."""

from __future__ import annotations

import argparse
import json

from ..listing import attach_snapshots, fetch_manifests, format_table
from .common import add_host_option, open_session, report_failure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the manifests of this host (or --host)")
    parser.add_argument(
        "--json", action="store_true", help="the manifest summaries (with their snapshots) as JSON"
    )
    parser.add_argument(
        "--no-snapshots",
        action="store_true",
        help="skip each snapshot's description and size (saves one request per manifest with snapshots)",
    )
    add_host_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        session = open_session(args)
        manifests = fetch_manifests(session.api, host=args.host)
        if not args.no_snapshots:
            attach_snapshots(session.api, manifests, host=args.host)
    except (OSError, RuntimeError, ValueError) as error:
        return report_failure("list", error)
    print(json.dumps(manifests, indent=2, sort_keys=True) if args.json else format_table(manifests))
    return 0
