"""`make bench`: first backup, no-change run and restore of a real tree against the local stack.

Prints, per case: wall seconds, MB/s, peak RSS of the uploader process, and requests by service as the
uploader counted them. Re-run it any time; figures depend on the machine, so compare within one run.

    .venv/bin/python bench/run.py [TREE]      # default: this Python's standard library
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLI = [sys.executable, "-m", "s3_sysbackup.cli"]


@dataclass
class Measurement:
    case: str
    seconds: float
    peak_rss_mb: float
    megabytes: float
    requests: dict[str, int]


def run_measured(args: list[str]) -> tuple[float, float]:
    """Run one CLI process; return (wall seconds, its peak RSS in MiB)."""
    started = time.perf_counter()
    process = subprocess.Popen([*CLI, *args])
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) not in (0, 2):
        raise SystemExit(f"s3-sysbackup {' '.join(args)} failed with status {status}")
    return elapsed, usage.ru_maxrss / 1024


def tree_megabytes(tree: Path) -> float:
    total = 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total / 1e6


def archive_case(case: str, config_dir: Path, stats_path: Path) -> Measurement:
    seconds, rss = run_measured(
        ["--config-dir", str(config_dir), "archive", "-q", "--stats-json", str(stats_path)]
    )
    stats = json.loads(stats_path.read_text())
    return Measurement(
        case, seconds, rss, stats.get("bytes_read", 0) / 1e6, flatten(stats.get("requests", {}))
    )


def restore_case(config_dir: Path, target: Path, stats_path: Path) -> Measurement:
    seconds, rss = run_measured(
        ["--config-dir", str(config_dir), "restore", "latest", "--target", str(target),
         "--stats-json", str(stats_path)]
    )  # fmt: skip
    stats = json.loads(stats_path.read_text())
    return Measurement(
        "restore", seconds, rss, stats.get("bytes_written", 0) / 1e6, flatten(stats.get("requests", {}))
    )


def flatten(requests: dict, prefix: str = "") -> dict[str, int]:
    flat: dict[str, int] = {}
    for key, value in requests.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + " "))
        else:
            flat[name] = int(value)
    return flat


def report(measurements: list[Measurement]) -> None:
    print(f"\n{'case':<16}{'seconds':>9}{'MB':>10}{'MB/s':>9}{'peak RSS MiB':>14}  requests")
    for m in measurements:
        rate = m.megabytes / m.seconds if m.seconds else 0.0
        requests = ", ".join(f"{k}={v}" for k, v in sorted(m.requests.items())) or "-"
        total = sum(m.requests.values())
        figures = f"{m.seconds:>9.2f}{m.megabytes:>10.1f}{rate:>9.1f}{m.peak_rss_mb:>14.1f}"
        print(f"{m.case:<16}{figures}  {total} ({requests})")


def main() -> int:
    tree = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(sysconfig.get_paths()["stdlib"])
    work = Path(tempfile.mkdtemp(prefix="s3sb-bench-"))
    state_dir, config_dir, target = work / "stack", work / "config", work / "restored"
    subprocess.run(
        [*CLI, "local", "up", "--state-dir", str(state_dir), "--config-dir", str(config_dir)], check=True
    )
    measurements: list[Measurement] = []
    try:
        picker = config_dir / "pickers.d" / "bench-tree"
        picker.write_text(f"#!/bin/sh\necho '{tree}'\n")
        picker.chmod(0o755)
        megabytes = tree_megabytes(tree)
        print(f"tree: {tree} ({megabytes:.1f} MB)")
        measurements.append(archive_case("first backup", config_dir, work / "first.json"))
        measurements.append(archive_case("no-change run", config_dir, work / "nochange.json"))
        measurements.append(restore_case(config_dir, target, work / "restore.json"))
    finally:
        subprocess.run([*CLI, "local", "down", "--state-dir", str(state_dir)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    report(measurements)
    children_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\nlargest peak RSS of any child process: {children_rss:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
