"""`s3-sysbackup local ...`: up, down, add-host, status, invoke."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .identities import DEFAULT_HOST

Handler = Callable[[argparse.Namespace], int]


def _reporting_errors(name: str) -> Handler:
    """`commands.<name>`, imported when it runs (the stack's modules cost every CLI run ~20 MiB otherwise);
    known failures (bad names, no stack, a failed start) end with a one-line message and status 2."""

    def run(args: argparse.Namespace) -> int:
        from . import commands
        from .stack import StackError
        from .template import TemplateError

        try:
            return getattr(commands, name)(args)
        except (StackError, TemplateError, ValueError) as error:
            print(f"s3-sysbackup local: {error}", file=sys.stderr)
            return 2

    return run


def register(subparsers: Any) -> None:
    local = subparsers.add_parser(
        "local", help="run the development stack on loopback (SeaweedFS, moto, API)"
    )
    commands = local.add_subparsers(dest="local_command", metavar="LOCAL_COMMAND")
    commands.required = True

    up = commands.add_parser("up", help="start a stack and write a host's config directory")
    up.add_argument("--state-dir", required=True, type=Path, help="where the stack keeps data, pids and logs")
    up.add_argument(
        "--config-dir", dest="local_config_dir", required=True, type=Path, help="host config to write"
    )
    up.add_argument("--host", default=DEFAULT_HOST, help=f"the first host's name (default {DEFAULT_HOST})")
    up.add_argument("--template", type=Path, default=None, help="template.yaml to read (default: the repo's)")
    up.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a template parameter default (repeatable), e.g. DaysRetained=1",
    )
    up.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="invocations of one function that may run at once (default 2)",
    )
    up.set_defaults(handler=_reporting_errors("up"))

    down = commands.add_parser("down", help="stop every process of a stack (idempotent)")
    down.add_argument("--state-dir", required=True, type=Path)
    down.set_defaults(handler=_reporting_errors("down"))

    add_host = commands.add_parser("add-host", help="make another host identity and its config directory")
    add_host.add_argument("name")
    add_host.add_argument("--state-dir", required=True, type=Path)
    add_host.add_argument("--config-dir", dest="local_config_dir", required=True, type=Path)
    add_host.set_defaults(handler=_reporting_errors("add_host"))

    status = commands.add_parser("status", help="print what runs where")
    status.add_argument("--state-dir", required=True, type=Path)
    status.set_defaults(handler=_reporting_errors("status"))

    invoke = commands.add_parser("invoke", help="run a function's handler with an event and print the result")
    invoke.add_argument("function", help="logical id (VerifyPackFunction) or folder name (verify_pack)")
    invoke.add_argument("--state-dir", required=True, type=Path)
    invoke.add_argument(
        "--event", type=Path, default=None, help="event JSON (default: the function's first in events/)"
    )
    invoke.set_defaults(handler=_reporting_errors("invoke"))
