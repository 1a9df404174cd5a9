"""What every sub-command does first: load the config, build the signed client, report errors plainly."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from ..api import ApiClient
from ..cache import ParentCache, host_state_dir
from ..config import Config, load_config
from ..credentials import load_credentials
from ..fetch import BlobFetcher
from ..index_rebuild import MemoryIndex
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


@contextlib.contextmanager
def blob_fetcher(session: Session, host: str | None) -> Iterator[BlobFetcher]:
    """A fetcher over this host's local index (the archive's cache), or, for another host's backups
    (`--host`, a restore principal), over an index built now from `GET /packs?host=`. A cache that
    cannot be opened (a recovery on another machine, as a user who may not write cache_dir) is
    replaced by an index in memory: the restore still works, it reads every pack's trailer first."""
    if host is None:
        config = session.config
        state_dir = host_state_dir(config.content.cache_dir, session.api.endpoint, config.config_dir)
        try:
            cache = ParentCache(state_dir, scope=session.api.endpoint)
        except (OSError, sqlite3.Error) as error:
            logger.warning(
                "cannot open the cache in %s (%s); indexing this host's packs in memory", state_dir, error
            )
        else:
            try:
                yield BlobFetcher(session.api, session.transfer, cache, progress=_progress)
            finally:
                cache.close()
            return
    fetcher = BlobFetcher(session.api, session.transfer, MemoryIndex(), host=host, progress=_progress)
    fetcher.rebuild_index()
    yield fetcher


def _progress(line: str) -> None:
    print(line, file=sys.stderr)


def report_failure(command: str, error: BaseException) -> int:
    """One clear line on stderr (the traceback only with -v), exit status 1."""
    logger.debug("%s failed", command, exc_info=error)
    print(f"s3-sysbackup {command}: error: {error}", file=sys.stderr)
    return 1


def add_host_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", help="another host's backups (needs a restore principal); default: this host's own"
    )
