"""`s3-sysbackup restore MANIFEST|latest --target DIR [PATH...]` or `... --snapshot NAME [--output FILE]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..archiver import write_stats_json
from ..fetch import BlobFetcher
from ..restorer import Restorer, RestoreResult, resolve_manifest_id
from ..snapshot_restore import SnapshotRestore, restore_through_command, write_to_file
from .common import Session, add_host_option, blob_fetcher, open_session, report_failure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "restore",
        help="restore a manifest into a directory",
        description=(
            "Restore MANIFEST (or `latest`) under --target, verifying every byte. PATHs (as backed up, "
            "e.g. /etc/ssh) restore only those subtrees. Exit status: 0 ok, 2 restored with warnings "
            "(owners, xattrs, devices not settable), 1 failed. With --snapshot NAME, the snapshot's stream "
            "is piped into the restore-through command its snapshotter printed (run by /bin/sh -c; shown "
            "on stderr first), or written raw with --output FILE (--output - for stdout)."
        ),
    )
    parser.add_argument("manifest", metavar="MANIFEST", help="a manifest id, or `latest`")
    parser.add_argument("paths", metavar="PATH", nargs="*", help="restore only these backed-up paths")
    parser.add_argument("--target", help="directory to restore into (created if missing)")
    parser.add_argument(
        "--snapshot",
        metavar="NAME",
        help="restore snapshot NAME through its restore-through command instead of files",
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="with --snapshot: write the raw stream to FILE (`-`: stdout) instead of running its command",
    )
    parser.add_argument(
        "--incomplete",
        action="store_true",
        help="with --snapshot and --output: write a failed snapshot's partial stream too",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace files already in the target (or the --output FILE)"
    )
    parser.add_argument(
        "--stats-json",
        type=Path,
        metavar="FILE",
        help="with --target: write the restore's figures (files, bytes, requests by service) to FILE",
    )
    add_host_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    problem = _conflicting_options(args)
    if problem:
        return report_failure("restore", ValueError(problem))
    try:
        session = open_session(args)
        started = time.monotonic()
        with blob_fetcher(session, args.host) as fetcher:
            fetcher.ask_urls_ahead()  # while the manifest is fetched (two functions, two cold starts)
            manifest_id = resolve_manifest_id(session.api, args.manifest, args.host)
            manifest = session.api.get_manifest(manifest_id, host=args.host)
            if args.snapshot is not None:
                return _restore_snapshot(args, fetcher, manifest)
            result = Restorer(fetcher, args.target, overwrite=args.overwrite).restore(manifest, args.paths)
        if args.stats_json is not None:
            write_stats_json(args.stats_json, _restore_stats(result, session, time.monotonic() - started))
    except (OSError, RuntimeError, ValueError) as error:
        return report_failure("restore", error)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{result.manifest_id}: restored {result.files} files, {result.dirs} directories, "
        f"{result.bytes_written} bytes into {args.target}"
    )
    return 2 if result.warnings else 0


def _restore_stats(result: RestoreResult, session: Session, elapsed_s: float) -> dict[str, Any]:
    return {
        "manifest_id": result.manifest_id,
        "files": result.files,
        "dirs": result.dirs,
        "bytes_written": result.bytes_written,
        "warnings": result.warnings,
        "requests": session.counter.as_dict(),
        "elapsed_s": round(elapsed_s, 3),
    }


def _conflicting_options(args: argparse.Namespace) -> str | None:
    if (args.target is None) == (args.snapshot is None):
        return "give either --target DIR or --snapshot NAME"
    if args.snapshot is not None and args.stats_json is not None:
        return "--stats-json goes with --target (a snapshot's figures are on stderr)"
    if args.snapshot is None and (args.output is not None or args.incomplete):
        return "--output and --incomplete go with --snapshot NAME"
    if args.snapshot is not None and args.paths:
        return "PATHs select files; a snapshot is restored whole"
    if args.incomplete and args.output is None:
        return "--incomplete needs --output FILE (a failed stream is never piped into its command)"
    return None


def _restore_snapshot(args: argparse.Namespace, fetcher: BlobFetcher, manifest: dict) -> int:
    restored: SnapshotRestore
    if args.output is None:
        restored = restore_through_command(fetcher, manifest, args.snapshot, announce=sys.stderr.buffer)
    else:
        restored = write_to_file(
            fetcher,
            manifest,
            args.snapshot,
            args.output,
            overwrite=args.overwrite,
            allow_incomplete=args.incomplete,
        )
    # stderr: stdout may be the stream itself (--output -) or the restore command's own output.
    print(
        f"{manifest.get('id')}: snapshot {restored.name!r}, {restored.bytes_written} bytes restored "
        f"{restored.destination}",
        file=sys.stderr,
    )
    return 0
