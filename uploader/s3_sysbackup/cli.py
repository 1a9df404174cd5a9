"""The `s3-sysbackup` command line: one sub-command per module, registered below."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

DEFAULT_CONFIG_DIR = "/etc/backup"

# Each module exposes `register(subparsers)`, which adds its sub-command(s) and sets `handler`
# (a callable taking the parsed namespace and returning the exit code).
COMMAND_MODULES: tuple[str, ...] = (
    "s3_sysbackup.commands.archive",
    "s3_sysbackup.commands.listing",
    "s3_sysbackup.commands.restore",
    "s3_sysbackup.commands.verify",
    # Provisioning (admin side; boto3 and cryptography come with the `provision` extra, imported lazily).
    "s3_sysbackup.commands.create_resources",
    "s3_sysbackup.commands.write_config",
    "s3_sysbackup.commands.import_credentials",
    "s3_sysbackup.commands.admin",
)
# Optional: present only with the `local` extra (the development stack).
OPTIONAL_COMMAND_MODULES: tuple[str, ...] = ("sysbackup_local.cli",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3-sysbackup",
        description=(
            "WORM backups of this host into an s3-sysbackup stack: pickers.d chooses files, "
            "snapshots.d streams dumps, the backend stores them under S3 Object Lock."
        ),
    )
    parser.add_argument(
        "--config-dir",
        default=DEFAULT_CONFIG_DIR,
        help=f"directory holding `conf`, pickers.d/ and snapshots.d/ (default {DEFAULT_CONFIG_DIR})",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for name in OPTIONAL_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
