"""`s3-sysbackup import-credentials FILE`: decrypt keys written by `write-config --encrypt-credentials`."""

from __future__ import annotations

import argparse
import configparser
from pathlib import Path

from ..provision.aws import ProvisionError
from ..provision.files import refuse_existing, write_atomically
from ..provision.host_config import CREDENTIALS_FILE_NAME
from ..provision.host_credentials import parse_credentials
from ..provision.passphrase import read_passphrase
from ..provision.sealing import unseal
from .common import report_failure


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-credentials",
        help="decrypt a host's keys into CONFIG_DIR/credentials",
        description=(
            "Decrypt FILE (from `write-config --encrypt-credentials`; ccrypt or s3-sysbackup's own "
            "format) into CONFIG_DIR/credentials, mode 0600. A wrong passphrase or a damaged file is "
            "refused and nothing is written."
        ),
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument(
        "--config-dir", dest="target_config_dir", type=Path, metavar="DIR", help="default: /etc/backup"
    )
    parser.add_argument("--passphrase-file", type=Path, help="passphrase on its first line (else prompted)")
    parser.add_argument("--force", action="store_true", help="replace an existing credentials file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        target = credentials_target(args.target_config_dir or Path(args.config_dir))
        import_credentials(args.file, target, args.passphrase_file, args.force)
    except (OSError, ProvisionError) as error:
        return report_failure("import-credentials", error)
    print(f"wrote {target}")
    return 0


def credentials_target(config_dir: Path) -> Path:
    """Where this host's conf says its keys are ([aws] credentials_file), else CONFIG_DIR/credentials."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(config_dir / "conf", encoding="utf-8")
    except configparser.Error as error:
        raise ProvisionError(f"{config_dir / 'conf'}: not a valid configparser file: {error}") from None
    configured = parser.get("aws", "credentials_file", fallback="").strip()
    # Relative to the config directory, as the uploader reads it (config.py).
    return (config_dir / (configured or CREDENTIALS_FILE_NAME)).resolve()


def import_credentials(source: Path, target: Path, passphrase_file: Path | None, force: bool) -> None:
    sealed = source.read_bytes()
    refuse_existing(target, force)
    plaintext = unseal(sealed, read_passphrase(passphrase_file, confirm=False))
    try:
        parse_credentials(plaintext.decode("utf-8"))
    except (ProvisionError, UnicodeDecodeError):
        # ccrypt has no integrity check: a damaged file decrypts to noise. Never install noise.
        raise ProvisionError(f"{source} did not decrypt to AWS credentials (damaged file?)") from None
    write_atomically(target, plaintext, 0o600)
