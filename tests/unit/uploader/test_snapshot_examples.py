"""The shipped snapshotters' wiring, with stand-in database programs on PATH.

(All three also run against real PostgreSQL, MariaDB and SQLite databases in
tests/integration/test_snapshots_databases.py; here, failures a real server will not produce on cue.)
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from conftest import write_script
from s3_sysbackup.snapshots import take_snapshot
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.manifest import SnapshotRecord, decode_stream_index

EXAMPLES = Path(__file__).resolve().parents[3] / "uploader" / "examples" / "snapshots.d"


def run_example(name: str) -> tuple[SnapshotRecord, bytes]:
    blobs: dict[str, bytes] = {}

    def add(kind: str, plaintext: bytes) -> str:
        blobs[blob_hash(plaintext)] = plaintext
        return blob_hash(plaintext)

    record = take_snapshot(EXAMPLES / name, 30, add)
    assert record.content is not None
    return record, b"".join(blobs[h] for h in decode_stream_index(blobs[record.content]))


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH for stand-ins of the database programs."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:/usr/bin:/bin")
    return directory


def test_every_example_is_executable_bash_using_the_fd_argument():
    for example in ("postgresql", "mysql", "sqlite"):
        script = EXAMPLES / example
        assert script.stat().st_mode & 0o111, example
        text = script.read_text()
        assert text.startswith("#!/bin/bash\n") and "OUT_FD=${1:-1}" in text and "set -euo pipefail" in text


def test_mysql_dumps_everything_consistently_and_restores_through_mysql(fake_bin, monkeypatch):
    write_script(
        fake_bin / "mysql",
        'case "$*" in *VERSION*) echo 10.11.6-MariaDB;; *) printf "app\\nmysql\\n";; esac\n',
    )
    write_script(fake_bin / "mysqldump", 'printf "%s\\n" "$@"\n')
    options_file = "/etc/backup/my backup's.cnf"
    monkeypatch.setenv("MYSQL_DEFAULTS_FILE", options_file)
    record, stream = run_example("mysql")
    assert record.error is None and record.exit_status == 0
    options = stream.decode().splitlines()
    assert options[0] == f"--defaults-extra-file={options_file}"  # mysql insists on it coming first
    for wanted in ("--single-transaction", "--all-databases", "--routines", "--events", "--skip-dump-date"):
        assert wanted in options
    assert "10.11.6-MariaDB" in record.description and "app mysql" in record.description
    assert shlex.split(record.restore_through or "") == ["mysql", f"--defaults-extra-file={options_file}"]


def test_mysqldump_failing_fails_the_snapshot(fake_bin):
    write_script(fake_bin / "mysql", "echo 8.0.36\n")
    write_script(
        fake_bin / "mysqldump", "echo '-- half a dump'\necho 'mysqldump: Got error: 2013' >&2\nexit 2\n"
    )
    record, stream = run_example("mysql")
    assert record.exit_status == 2 and record.error is not None and "Got error: 2013" in record.error
    assert stream == b"-- half a dump\n"


def test_postgresql_a_failing_database_fails_the_whole_snapshot(fake_bin, monkeypatch, tmp_path):
    write_script(
        fake_bin / "psql",
        'case "$*" in *current_user*) printf postgres;; *server_version*) printf 15.6;;'
        " *datname*) printf 'template1\\0postgres\\0shop\\0';; esac\n",
    )
    write_script(fake_bin / "pg_dumpall", "echo 'CREATE ROLE postgres;'\necho 'CREATE ROLE app;'\n")
    write_script(
        fake_bin / "pg_dump",
        'for a in "$@"; do case "$a" in --dbname=*shop*) echo "pg_dump: error: connection lost" >&2; exit 1;;'
        ' esac; done\necho "-- dump $*"\n',
    )
    monkeypatch.setenv("PGHOST", "db.internal")  # not root-with-a-local-socket: no runuser
    monkeypatch.setenv("PG_RESTRICT_KEY_FILE", str(tmp_path / "key"))
    record, stream = run_example("postgresql")
    assert record.exit_status == 1 and record.error is not None and "connection lost" in record.error
    text = stream.decode()
    assert (
        "CREATE ROLE app;" in text and "CREATE ROLE postgres;" not in text
    )  # our own role is not re-created
    assert "\\connect template1" in text and "\\connect postgres" in text
    assert record.restore_through == "psql -X -q -o /dev/null -v ON_ERROR_STOP=1 -d postgres"


def test_sqlite_without_its_database_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("SQLITE_DATABASE", str(tmp_path / "missing.db"))
    record, stream = run_example("sqlite")
    assert record.exit_status == 1 and record.error is not None and "no SQLite database at" in record.error
    assert stream == b""


def test_postgresql_a_failing_database_list_fails_the_snapshot(fake_bin, monkeypatch, tmp_path):
    write_script(
        fake_bin / "psql",
        'case "$*" in *datname*) echo "psql: error: permission denied" >&2; exit 2;; *) printf x;; esac\n',
    )
    write_script(fake_bin / "pg_dump", "echo usage\n")
    monkeypatch.setenv("PGHOST", "db.internal")
    monkeypatch.setenv("PG_RESTRICT_KEY_FILE", str(tmp_path / "key"))
    record, stream = run_example("postgresql")
    assert record.exit_status == 2 and "permission denied" in (record.error or "")
    assert stream == b""
