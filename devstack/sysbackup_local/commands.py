"""What each `s3-sysbackup local` command does (cli.py parses; this loads the stack's modules only when a
local command runs, so the host's own commands never import them)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .stack import LocalStack, StackError


def parse_parameters(pairs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` pairs from --parameter."""
    parameters = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise StackError(f"--parameter wants NAME=VALUE, got {pair!r}")
        parameters[name] = value
    return parameters


def up(args: argparse.Namespace) -> int:
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


def down(args: argparse.Namespace) -> int:
    try:
        stack = LocalStack(args.state_dir)
    except StackError:
        print(f"no stack in {args.state_dir}; nothing to stop", file=sys.stderr)
        return 0
    stack.stop()
    return 0


def add_host(args: argparse.Namespace) -> int:
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


def status(args: argparse.Namespace) -> int:
    print(json.dumps(LocalStack(args.state_dir).status(), indent=2))
    return 0


def default_event_file(repo: Path, folder: str, logical_id: str) -> Path:
    """The first event (by name) in events/ named `<folder>*.json` or `<LogicalId>*.json`."""
    events = repo / "events"
    candidates = sorted(path for path in events.glob("*.json") if path.stem.startswith((folder, logical_id)))
    if not candidates:
        raise StackError(f"no event for {logical_id} in {events} (looked for {folder}*.json)")
    return candidates[0]


def invoke(args: argparse.Namespace) -> int:
    stack = LocalStack(args.state_dir)
    spec = stack.template.function(args.function)
    event_path = args.event or default_event_file(Path(stack.info["repo"]), spec.folder, spec.logical_id)
    event = json.loads(event_path.read_text())
    result = stack.invoke(spec.logical_id, event)
    print(json.dumps(result, indent=2, default=str))
    return 0
