"""`s3-sysbackup write-config`: a host's conf, example scripts, credentials and systemd units."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_CACHE_DIR
from ..provision.aws import ProvisionError, boto3_session
from ..provision.exports import (
    API_ENDPOINT_EXPORT,
    BUCKET_EXPORT,
    HOST_ROLE_EXPORT,
    HOSTS_GROUP_EXPORT,
    RESTORE_ROLE_EXPORT,
    PackageExports,
    add_package_options,
    read_exports,
    validate_package_name,
)
from ..provision.files import refuse_existing, write_atomically
from ..provision.host_config import CREDENTIALS_FILE_NAME, HostConfig, render_conf, write_examples
from ..provision.host_credentials import (
    PLACEHOLDER,
    AccessKey,
    create_host_user,
    delete_host_user,
    render_credentials,
    validate_host_name,
)
from ..provision.passphrase import read_passphrase
from ..provision.sealing import SealError, check_passphrase, seal
from ..provision.systemd import DEFAULT_SYSTEMD_DIR, UnitSettings, write_units
from .common import report_failure

FALLBACK_EXECUTABLE = Path("/usr/local/bin/s3-sysbackup")
ROLE_EXPORTS = {"host": HOST_ROLE_EXPORT, "restore": RESTORE_ROLE_EXPORT}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "write-config",
        help="write a host's conf, example pickers/snapshots, credentials and systemd timer",
        description=(
            "Write CONFIG_DIR/conf (API endpoint and bucket from the package's CloudFormation exports "
            "unless given), example pickers.d/ and snapshots.d/ scripts, a 0600 credentials file and "
            "the systemd service and daily timer. --create-user makes the host's IAM user (in the "
            "package's hosts group) and its access key; --encrypt-credentials FILE puts those keys, "
            "encrypted under a passphrase, in FILE instead, for `import-credentials` on the host."
        ),
    )
    # Its own dest: the global --config-dir is parsed before the sub-command and would be overwritten.
    parser.add_argument(
        "--config-dir", dest="target_config_dir", type=Path, metavar="DIR", help="default: /etc/backup"
    )
    add_package_options(parser)
    parser.add_argument("--api-endpoint", help="the API base URL (default: the <package>-ApiEndpoint export)")
    parser.add_argument("--bucket", help="the bucket (default: the <package>-BucketName export)")
    parser.add_argument("--create-user", metavar="NAME", help="create IAM user NAME (= the host name)")
    parser.add_argument(
        "--assume-role",
        choices=sorted(ROLE_EXPORTS),
        help="sign through the package's host role (short-lived sessions), or its restore role "
        "(disaster recovery with an administrator's keys: reads any host's backups)",
    )
    parser.add_argument(
        "--encrypt-credentials",
        type=Path,
        metavar="FILE",
        help="write the new user's keys to FILE encrypted (ccrypt if installed) instead of CONFIG_DIR",
    )
    parser.add_argument("--passphrase-file", type=Path, help="passphrase on its first line (else prompted)")
    parser.add_argument(
        "--systemd-dir",
        type=Path,
        default=DEFAULT_SYSTEMD_DIR,
        help=f"where the units go (default {DEFAULT_SYSTEMD_DIR})",
    )
    parser.add_argument("--no-systemd", action="store_true", help="do not write systemd units")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="the host's cache_dir")
    parser.add_argument("--executable", type=Path, help="s3-sysbackup path for the unit (default: on PATH)")
    parser.add_argument("--force", action="store_true", help="replace an existing conf and credentials")
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class Written:
    paths: list[Path]
    user: str | None


def run(args: argparse.Namespace) -> int:
    try:
        written = write_config(args)
    except (OSError, ProvisionError, ValueError) as error:
        return report_failure("write-config", error)
    for path in written.paths:
        print(f"wrote {path}")
    if written.user:
        print(f"created IAM user {written.user} in the hosts group")
    if not args.no_systemd:
        print(
            "enable the daily run with: systemctl daemon-reload && systemctl enable --now s3-sysbackup.timer"
        )
    return 0


def write_config(args: argparse.Namespace) -> Written:
    config_dir: Path = args.target_config_dir or Path(args.config_dir)
    package = validate_package_name(args.package)
    credentials_path = config_dir / CREDENTIALS_FILE_NAME
    # Everything that can fail without side effects comes first: the IAM user is made last of all.
    _check_arguments(args, config_dir / "conf", credentials_path)
    passphrase = _passphrase(args)
    session = boto3_session(args.region, args.profile)
    exports = _exports(args, session, package)
    host_config = _host_config(args, package, session.region_name, exports)
    key = None
    if args.create_user:
        group = exports.require(HOSTS_GROUP_EXPORT)
        key = create_host_user(session.client("iam"), args.create_user, group, package)
    try:
        paths = _write_credentials(args, key, credentials_path, passphrase)
    except (OSError, SealError):
        if key is not None:
            # No file holds the secret: an unusable user must not be left behind.
            delete_host_user(session.client("iam"), key, exports.require(HOSTS_GROUP_EXPORT))
        raise
    paths += _write_host_files(args, config_dir, host_config)
    return Written(paths, key.user_name if key else None)


def _check_arguments(args: argparse.Namespace, conf_path: Path, credentials_path: Path) -> None:
    refuse_existing(conf_path, args.force)
    if args.encrypt_credentials is not None:
        if not args.create_user:
            raise ProvisionError("--encrypt-credentials encrypts the keys of --create-user NAME: give both")
        refuse_existing(args.encrypt_credentials, args.force)
    elif args.create_user:
        refuse_existing(credentials_path, args.force)
    if args.create_user:
        validate_host_name(args.create_user)
    if args.assume_role == "restore" and args.create_user:
        raise ProvisionError("a host user cannot assume the restore role: drop --create-user")


def _passphrase(args: argparse.Namespace) -> str | None:
    if args.encrypt_credentials is None:
        return None
    passphrase = read_passphrase(args.passphrase_file, confirm=True)
    check_passphrase(passphrase)
    return passphrase


def _exports(args: argparse.Namespace, session: Any, package: str) -> PackageExports:
    # Endpoint and bucket given, no user to make and no role to name: nothing to look up.
    if args.api_endpoint and args.bucket and not args.create_user and not args.assume_role:
        return PackageExports(package, {})
    return read_exports(session.client("cloudformation"), package)


def _host_config(args: argparse.Namespace, package: str, region: str, exports: PackageExports) -> HostConfig:
    return HostConfig(
        package=package,
        region=region,
        api_endpoint=args.api_endpoint or exports.require(API_ENDPOINT_EXPORT),
        bucket=args.bucket or exports.values.get(BUCKET_EXPORT),
        host_role_arn=exports.values.get(HOST_ROLE_EXPORT),
        cache_dir=args.cache_dir,
        assume_role_arn=exports.require(ROLE_EXPORTS[args.assume_role]) if args.assume_role else None,
    )


def _write_host_files(args: argparse.Namespace, config_dir: Path, host_config: HostConfig) -> list[Path]:
    """conf, the example scripts and the systemd units."""
    conf_path = config_dir / "conf"
    write_atomically(conf_path, render_conf(host_config).encode("utf-8"), 0o644)
    paths = [conf_path, *write_examples(config_dir)]
    if not args.no_systemd:
        units = UnitSettings(_executable(args.executable), config_dir, args.cache_dir)
        paths += write_units(args.systemd_dir, units)
    return paths


def _write_credentials(
    args: argparse.Namespace, key: AccessKey | None, credentials_path: Path, passphrase: str | None
) -> list[Path]:
    if key is not None and passphrase is not None:
        sealed = seal(render_credentials(key).encode("utf-8"), passphrase)
        write_atomically(args.encrypt_credentials, sealed, 0o600)
        return [args.encrypt_credentials]
    if key is not None:
        write_atomically(credentials_path, render_credentials(key).encode("utf-8"), 0o600)
        return [credentials_path]
    if credentials_path.exists():
        return []  # keys already there: keep them
    write_atomically(credentials_path, PLACEHOLDER.encode("utf-8"), 0o600)
    return [credentials_path]


def _executable(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    found = shutil.which("s3-sysbackup")
    return Path(found) if found else FALLBACK_EXECUTABLE
