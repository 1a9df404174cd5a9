"""What every sub-command does first: load the config, build the signed client, report errors plainly."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from ..api import ApiClient
from ..config import Config, load_config
from ..credentials import load_credentials
from ..net import RequestCounter
from ..transfer import Transfer

logger = logging.getLogger("s3_sysbackup")


@dataclass
class Session:
    config: Config
    api: ApiClient
    transfer: Transfer
    counter: RequestCounter


def open_session(args: argparse.Namespace) -> Session:
    config = load_config(args.config_dir)
    credentials = load_credentials(config.aws, config.api.region)
    counter = RequestCounter()
    api = ApiClient(config.api.endpoint, config.api.region, credentials, counter=counter)
    return Session(config, api, Transfer(counter=counter), counter)


def report_failure(command: str, error: BaseException) -> int:
    """One clear line on stderr (the traceback only with -v), exit status 1."""
    logger.debug("%s failed", command, exc_info=error)
    print(f"s3-sysbackup {command}: error: {error}", file=sys.stderr)
    return 1


def add_host_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", help="another host's backups (needs a restore principal); default: this host's own"
    )
