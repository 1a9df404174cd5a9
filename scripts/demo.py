"""`make demo`: start the local stack, back up a real tree, restore and verify it byte for byte, stop.

Everything runs through the `s3-sysbackup` command line, exactly as a sysadmin would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".demo"
CLI = [sys.executable, "-m", "s3_sysbackup.cli"]


def run(*args: str) -> None:
    print("$ s3-sysbackup " + " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True)


def write_picker(config_dir: Path, tree: Path) -> None:
    picker = config_dir / "pickers.d" / "demo-tree"
    picker.write_text(f"#!/bin/sh\n# Pick the demo tree: one path per line.\necho '{tree}'\n")
    picker.chmod(0o755)


def differences(source: Path, restored: Path) -> list[str]:
    """Compare type, bytes, mode, mtime and link targets of every entry under `source`."""
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(source):
        for name in dirnames + filenames:
            original = Path(dirpath) / name
            copy = restored / original.relative_to("/")
            try:
                a, b = original.lstat(), copy.lstat()
            except FileNotFoundError:
                problems.append(f"missing: {copy}")
                continue
            if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode) or stat.S_IMODE(a.st_mode) != stat.S_IMODE(
                b.st_mode
            ):
                problems.append(f"type/mode differs: {original}")
            elif stat.S_ISLNK(a.st_mode):
                if os.readlink(original) != os.readlink(copy):
                    problems.append(f"link target differs: {original}")
            elif stat.S_ISREG(a.st_mode):
                if a.st_mtime_ns != b.st_mtime_ns:
                    problems.append(f"mtime differs: {original}")
                if original.read_bytes() != copy.read_bytes():
                    problems.append(f"content differs: {original}")
    return problems


def requests_summary(stats_path: Path, label: str) -> str:
    """What a run asked of the API and S3, from its --stats-json (a no-change run: the commit alone)."""
    requests = json.loads(stats_path.read_text())["requests"]
    counted = [
        f"{service} {route}: {count}"
        for service, routes in sorted(requests.items())
        for route, count in sorted(routes.items())
    ]
    return f"{label}: {', '.join(counted) or 'no requests'}"


def main() -> int:
    tree = Path(sysconfig.get_paths()["stdlib"]) / "json"
    if len(sys.argv) > 1:
        tree = Path(sys.argv[1]).resolve()
    shutil.rmtree(WORK, ignore_errors=True)
    state_dir, config_dir, target = WORK / "stack", WORK / "config", WORK / "restored"
    run("local", "up", "--state-dir", str(state_dir), "--config-dir", str(config_dir))
    try:
        write_picker(config_dir, tree)
        run("--config-dir", str(config_dir), "archive", "--stats-json", str(WORK / "first-run.json"))
        run("--config-dir", str(config_dir), "archive", "--stats-json", str(WORK / "no-change-run.json"))
        run("--config-dir", str(config_dir), "list")
        run("--config-dir", str(config_dir), "restore", "latest", "--target", str(target))
        run("--config-dir", str(config_dir), "verify", "latest", "--read-data")
    finally:
        run("local", "down", "--state-dir", str(state_dir))
    print(requests_summary(WORK / "first-run.json", "first run"))
    print(requests_summary(WORK / "no-change-run.json", "no-change run"))
    problems = differences(tree, target)
    for problem in problems[:20]:
        print(problem)
    if problems:
        print(f"demo FAILED: {len(problems)} differences between {tree} and its restore")
        return 1
    print(f"demo OK: {tree} backed up, restored into {target} and verified byte for byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
