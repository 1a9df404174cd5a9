"""A failed snapshotter against the real stack: recorded, a non-zero exit, and never restored as good."""

from __future__ import annotations

import json
from pathlib import Path

from sysbackup_local.stack import LocalHost
from test_archive_restore import cli


def test_a_failed_dump_is_recorded_listed_as_failed_and_refused_by_restore(
    host_config: LocalHost, tmp_path: Path
):
    snapshots = host_config.config_dir / "snapshots.d"
    (snapshots / "10-broken").write_text(
        "#!/bin/bash\necho 'nightly dump'\necho '::restore-through::cat > /dev/null'\n"
        "echo 'half a dump' >&${1:-1}\necho 'server closed the connection' >&2\nexit 3\n"
    )
    (snapshots / "20-fine").write_text("#!/bin/sh\necho '::restore-through::cat'\necho 'whole' >&$1\n")
    for script in snapshots.iterdir():
        script.chmod(0o755)
    conf = host_config.config_dir / "conf"
    conf.write_text(conf.read_text().replace("[content]\n", f"[content]\ncache_dir = {tmp_path / 'cache'}\n"))

    archived = cli(host_config.config_dir, "archive", "-q")
    assert archived.returncode == 2, archived.stderr  # committed, with a warning
    assert "snapshot 10-broken: exited with status 3" in archived.stderr

    table = cli(host_config.config_dir, "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any(line.startswith("  snapshot 10-broken  12 B  FAILED (exited with status 3") for line in lines)
    assert "  snapshot 20-fine  6 B  ok" in lines

    refused = cli(host_config.config_dir, "restore", "latest", "--snapshot", "10-broken")
    assert refused.returncode == 1
    assert "failed when it was taken" in refused.stderr and "server closed the connection" in refused.stderr

    partial = tmp_path / "partial.out"
    written = cli(
        host_config.config_dir, "restore", "latest", "--snapshot", "10-broken", "--output", str(partial),
        "--incomplete",
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert partial.read_text() == "half a dump\n"

    piped = cli(host_config.config_dir, "restore", "latest", "--snapshot", "20-fine")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "whole\n"  # through its command, `cat`, which writes to our stdout
    listed = json.loads(cli(host_config.config_dir, "list", "--json").stdout)
    assert {s["name"]: s["exit_status"] for s in listed[-1]["snapshots"]} == {"10-broken": 3, "20-fine": 0}
