"""Issue 3: `make bench` (bench/run.py) prints first backup, no-change run and restore with seconds, MB/s,
peak RSS and requests by service. Run here on a small tree (it starts and stops its own stack)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_issue3_support import quiet_directory

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"(\d+(?:\.\d+)?)"
ROW = re.compile(
    rf"^(first backup|no-change run|restore)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+(\d+) \((.*)\)$"
)


def test_the_bench_prints_every_case_with_its_figures() -> None:
    with quiet_directory() as quiet:
        tree = quiet / "tree"
        (tree / "sub").mkdir(parents=True)
        for index in range(20):
            (tree / "sub" / f"file-{index}").write_bytes(os.urandom(200_000))
        time.sleep(1.1)  # settled files: the no-change run may trust its cache
        bench = subprocess.run(
            [sys.executable, str(REPO / "bench" / "run.py"), str(tree)],
            capture_output=True, text=True, timeout=600, cwd=REPO,
        )  # fmt: skip
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]

    rows = {match[1]: match for match in map(ROW.match, bench.stdout.splitlines()) if match}
    assert rows.keys() == {"first backup", "no-change run", "restore"}, bench.stdout
    for case, row in rows.items():
        seconds, megabytes, rate, peak_rss = (float(row[i]) for i in range(2, 6))
        requests = dict(item.split("=") for item in row[7].split(", ")) if row[7] != "-" else {}
        assert seconds > 0 and peak_rss > 10, (case, row[0])
        assert int(row[6]) == sum(int(count) for count in requests.values()) > 0, (case, row[0])
        if case != "no-change run":  # both move the whole tree (4 MB)
            assert megabytes >= 4.0 and rate > 0, (case, row[0])
    assert "s3 put" in rows["first backup"][7] and "s3 get" in rows["restore"][7]
    assert "POST /downloads" in rows["restore"][7]
    assert "largest peak RSS of any child process" in bench.stdout
