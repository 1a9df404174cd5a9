"""`s3-sysbackup local ...`: up, down, add-host, status, invoke."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .stack import DEFAULT_HOST, LocalStack, StackError
from .template import TemplateError

Handler = Callable[[argparse.Namespace], int]


def _reporting_errors(handler: Handler) -> Handler:
    """Known failures (bad names, no stack, a failed start) end with a one-line message and status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
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
    up.set_defaults(handler=_reporting_errors(_up))

    down = commands.add_parser("down", help="stop every process of a stack (idempotent)")
    down.add_argument("--state-dir", required=True, type=Path)
    down.set_defaults(handler=_reporting_errors(_down))

    add_host = commands.add_parser("add-host", help="make another host identity and its config directory")
    add_host.add_argument("name")
    add_host.add_argument("--state-dir", required=True, type=Path)
    add_host.add_argument("--config-dir", dest="local_config_dir", required=True, type=Path)
    add_host.set_defaults(handler=_reporting_errors(_add_host))

    status = commands.add_parser("status", help="print what runs where")
    status.add_argument("--state-dir", required=True, type=Path)
    status.set_defaults(handler=_reporting_errors(_status))

    invoke = commands.add_parser("invoke", help="run a function's handler with an event and print the result")
    invoke.add_argument("function", help="logical id (VerifyPackFunction) or folder name (verify_pack)")
    invoke.add_argument("--state-dir", required=True, type=Path)
    invoke.add_argument(
        "--event", type=Path, default=None, help="event JSON (default: the function's first in events/)"
    )
    invoke.set_defaults(handler=_reporting_errors(_invoke))


def parse_parameters(pairs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` pairs from --parameter."""
    parameters = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise StackError(f"--parameter wants NAME=VALUE, got {pair!r}")
        parameters[name] = value
    return parameters


def _up(args: argparse.Namespace) -> int:
    stack = LocalStack.start(
        args.state_dir,
        args.local_config_dir,
        host=args.host,
        template_path=args.template,
        parameters=parse_parameters(args.parameter),
        concurrency=args.concurrency,
    )
    print(json.dumps(stack.status(), indent=2))
    return 0


def _down(args: argparse.Namespace) -> int:
    try:
        stack = LocalStack(args.state_dir)
    except StackError:
        print(f"no stack in {args.state_dir}; nothing to stop", file=sys.stderr)
        return 0
    stack.stop()
    return 0


def _add_host(args: argparse.Namespace) -> int:
    identity = LocalStack(args.state_dir).add_host(args.name, args.local_config_dir)
    print(
        json.dumps(
            {
                "host": identity.name,
                "principal": identity.principal_arn,
                "config_dir": str(args.local_config_dir),
            }
        )
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    print(json.dumps(LocalStack(args.state_dir).status(), indent=2))
    return 0


def default_event_file(repo: Path, folder: str, logical_id: str) -> Path:
    """The first event (by name) in events/ named `<folder>*.json` or `<LogicalId>*.json`."""
    events = repo / "events"
    candidates = sorted(path for path in events.glob("*.json") if path.stem.startswith((folder, logical_id)))
    if not candidates:
        raise StackError(f"no event for {logical_id} in {events} (looked for {folder}*.json)")
    return candidates[0]


def _invoke(args: argparse.Namespace) -> int:
    stack = LocalStack(args.state_dir)
    spec = stack.template.function(args.function)
    event_path = args.event or default_event_file(Path(stack.info["repo"]), spec.folder, spec.logical_id)
    event = json.loads(event_path.read_text())
    result = stack.invoke(spec.logical_id, event)
    print(json.dumps(result, indent=2, default=str))
    return 0
