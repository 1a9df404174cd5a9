"""The host CLI against the local stack: archive a crafted tree, restore it exactly, a no-change re-run."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from s3_sysbackup import sigv4
from s3_sysbackup.api import ClockSkewError
from s3_sysbackup.commands.common import open_session
from sysbackup_local.stack import LocalHost

QUIET_BASE = os.environ.get("S3SB_TEST_QUIET_DIR", "/var/tmp")
SIGNIFICANT = 2 * 1024 * 1024 + 4321  # more than one chunk and more than one small-file blob


def build_tree(top: Path) -> None:
    (top / "etc" / "app").mkdir(parents=True)
    (top / "empty-dir").mkdir()
    (top / "etc" / "app" / "app.conf").write_bytes(b"listen = 8080\n")
    (top / "etc" / "app" / "secret").write_bytes(b"s3cr3t")
    (top / "etc" / "app" / "secret").chmod(0o600)
    (top / "etc" / "app").chmod(0o750)
    (top / "empty").write_bytes(b"")
    (top / "name with spaces & ünïcode").write_bytes(b"odd name")
    (top / "new\nline").write_bytes(b"newline in the name")
    (top / "big.bin").write_bytes(os.urandom(SIGNIFICANT))
    (top / "link").symlink_to("etc/app/app.conf")
    (top / "dangling").symlink_to("/does/not/exist")
    (top / "hard-a").write_bytes(b"two names")
    os.link(top / "hard-a", top / "hard-b")
    os.mkfifo(top / "fifo")


def describe(top: Path) -> dict[str, tuple]:
    """Type, mode, mtime, content or link target, hard-link peer of everything under `top`."""
    seen: dict[str, tuple] = {}
    first_name: dict[int, str] = {}
    for path in sorted([top, *top.rglob("*")]):
        st = path.lstat()
        rel = str(path.relative_to(top))
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        peer = first_name.setdefault(st.st_ino, rel) if st.st_nlink > 1 and stat.S_ISREG(st.st_mode) else None
        seen[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns, content, peer)
    return seen


def cli(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3_sysbackup.cli", "--config-dir", str(config_dir), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Where outputs go. Not next to the source: a new entry in an ancestor of a picked path changes
    that ancestor's mtime, hence its tree, and the second run would rightly send new trees."""
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


@pytest.fixture
def quiet_dir() -> Iterator[Path]:
    """A directory whose ancestors nobody touches during the test (unlike /tmp, where other tests
    create files): an ancestor's new mtime is a real change, and would make a run send new trees."""
    directory = Path(tempfile.mkdtemp(prefix="s3sb-test-", dir=QUIET_BASE))
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def backed_up(host_config: LocalHost, quiet_dir: Path, work: Path) -> Path:
    """A crafted tree picked by the host's only picker; the cache kept in `work`."""
    source = quiet_dir / "source"
    source.mkdir()
    build_tree(source)
    conf = host_config.config_dir / "conf"
    conf.write_text(conf.read_text().replace("[content]\n", f"[content]\ncache_dir = {work / 'cache'}\n"))
    picker = host_config.config_dir / "pickers.d" / "10-source"
    picker.write_text(f"#!/bin/sh\necho '{source}'\n")
    picker.chmod(0o755)
    # Files changed within 1 s of a scan are read again next time (their mtime may not show a later
    # change); let them settle so the second run can trust the parent cache.
    time.sleep(1.1)
    return source


def test_round_trip_is_exact_and_a_second_run_sends_nothing(
    host_config: LocalHost, backed_up: Path, work: Path
):
    first_stats = work / "first.json"
    first = cli(host_config.config_dir, "archive", "-q", "--stats-json", str(first_stats))
    assert first.returncode == 0, first.stderr
    figures = json.loads(first_stats.read_text())
    # Data and trees share packs: this small tree is one pack, one PUT.
    assert figures["files"] == 8 and figures["packs"] == 1 and figures["requests"]["s3"] == {"put": 1}

    target = work / "restored"
    restored = cli(host_config.config_dir, "restore", "latest", "--target", str(target))
    assert restored.returncode == 0, restored.stderr
    assert describe(target / str(backed_up).lstrip("/")) == describe(backed_up)

    second_stats = work / "second.json"
    second = cli(host_config.config_dir, "archive", "-q", "--stats-json", str(second_stats))
    assert second.returncode == 0, second.stderr
    again = json.loads(second_stats.read_text())
    assert again["files_read"] == 0 and again["packs"] == 0 and again["bytes_uploaded"] == 0
    assert again["requests"]["api"] == {"POST /manifests": 1}
    assert "s3" not in again["requests"]

    listing = cli(host_config.config_dir, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    manifests = json.loads(listing.stdout)
    assert [m["manifest_id"] for m in manifests] == [figures["manifest_id"], again["manifest_id"]]
    assert manifests[0]["root"] == manifests[1]["root"]  # unchanged tree, same Merkle root

    verified = cli(host_config.config_dir, "verify", "latest", "--read-data")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_restore_refuses_a_non_empty_target(host_config: LocalHost, backed_up: Path, work: Path):
    assert cli(host_config.config_dir, "archive", "-q").returncode == 0
    target = work / "occupied"
    target.mkdir()
    (target / "keep").write_text("mine")
    refused = cli(host_config.config_dir, "restore", "latest", "--target", str(target))
    assert refused.returncode == 1 and "not empty" in refused.stderr
    assert (target / "keep").read_text() == "mine"


def test_crashed_runs_are_finished_by_the_next_run_without_resending(
    host_config: LocalHost, backed_up: Path, work: Path
):
    def archive(fault: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "S3SB_FAULT": fault} if fault else None
        return subprocess.run(
            [sys.executable, "-m", "s3_sysbackup.cli", "--config-dir", str(host_config.config_dir), "archive",
             "-q", "--stats-json", str(work / "stats.json")],
            capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip

    crashed = archive("after-index")
    assert crashed.returncode == 1 and "injected fault at after-index" in crashed.stderr
    finished = archive()
    assert finished.returncode == 0, finished.stderr
    figures = json.loads((work / "stats.json").read_text())
    # Every file read again (no parent cache), every data blob found in the local index the PUT wrote.
    assert figures["data_packs"] == 0 and figures["files_read"] == figures["files"]

    (backed_up / "etc" / "app" / "app.conf").write_bytes(b"listen = 9090\n")
    crashed = archive("mid-commit")
    assert crashed.returncode == 1
    listing = json.loads(cli(host_config.config_dir, "list", "--json").stdout)
    landed = listing[-1]["manifest_id"]  # the crashed run's commit did land
    finished = archive()
    assert finished.returncode == 0, finished.stderr
    listing = json.loads(cli(host_config.config_dir, "list", "--json").stdout)
    assert listing[-1]["parent"] == landed


def test_a_wrong_host_clock_is_named_as_such(host_config: LocalHost, monkeypatch: pytest.MonkeyPatch):
    session = open_session(Namespace(config_dir=host_config.config_dir))
    real_now = sigv4.utc_now
    monkeypatch.setattr(sigv4, "utc_now", lambda: real_now() - timedelta(minutes=20))
    with pytest.raises(ClockSkewError, match="host clock is off by"):
        session.api.list_manifests()


def test_a_snapshot_stream_comes_back_byte_for_byte(host_config: LocalHost, work: Path):
    dump = work / "dump.sql"
    dump.write_bytes(b"".join(b"INSERT INTO t VALUES (%d, 'row');\n" % i for i in range(100_000)))
    snapshotter = host_config.config_dir / "snapshots.d" / "db"
    snapshotter.write_text(
        f"#!/bin/sh\necho 'test dump'\necho '::restore-through::cat > /dev/null'\ncat {dump} >&$1\n"
    )
    snapshotter.chmod(0o755)
    conf = host_config.config_dir / "conf"
    conf.write_text(conf.read_text().replace("[content]\n", f"[content]\ncache_dir = {work / 'cache'}\n"))
    archived = cli(host_config.config_dir, "archive", "-q")
    assert archived.returncode == 0, archived.stderr  # a snapshot alone is a complete backup
    streamed = subprocess.run(
        [sys.executable, "-m", "s3_sysbackup.cli", "--config-dir", str(host_config.config_dir),
         "restore", "latest", "--snapshot", "db", "--output", "-"],
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == dump.read_bytes()
