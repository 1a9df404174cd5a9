"""Snapshotters: the stream on fd 3, failures recorded (never passed off as good), restore-through."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from conftest import write_script
from s3_sysbackup import restorer as restorer_module
from s3_sysbackup import snapshots as snapshots_module
from s3_sysbackup.archiver import EXIT_OK, EXIT_WARNINGS
from s3_sysbackup.cli import main
from s3_sysbackup.fetch import BlobFetcher
from s3_sysbackup.index_rebuild import MemoryIndex
from s3_sysbackup.listing import format_table, human_bytes
from s3_sysbackup.restorer import RestoreError, write_snapshot
from s3_sysbackup.snapshot_restore import restore_through_command, write_to_file
from s3_sysbackup.snapshots import parse_description, take_snapshot
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.manifest import decode_stream_index

PAYLOAD = b"".join(b"INSERT INTO t VALUES (%d, 'row %d');\n" % (i, i * 7) for i in range(40_000))


class BlobStore:
    """`add_blob` for take_snapshot: keeps every blob, so the stream can be put back together."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, kind: str, plaintext: bytes) -> str:
        assert kind == "data"
        digest = blob_hash(plaintext)
        self.blobs[digest] = plaintext
        return digest

    def stream(self, index: str | None) -> bytes:
        assert index is not None
        return b"".join(self.blobs[digest] for digest in decode_stream_index(self.blobs[index]))


@pytest.fixture
def store() -> BlobStore:
    return BlobStore()


@pytest.fixture
def payload_file(tmp_path: Path) -> Path:
    path = tmp_path / "payload.sql"
    path.write_bytes(PAYLOAD)
    return path


# -- taking snapshots -------------------------------------------------------------------------


def test_the_stream_description_and_restore_through_are_recorded(tmp_path, store, payload_file):
    script = write_script(
        tmp_path / "db",
        'echo "nightly dump of db"\necho "::restore-through::psql -d db"\necho more\n'
        f"cat {payload_file} >&$1\n",
    )
    record = take_snapshot(script, 10, store.add)
    assert (record.name, record.exit_status, record.error) == ("db", 0, None)
    assert record.description == "nightly dump of db\nmore"
    assert record.restore_through == "psql -d db"
    assert record.size == len(PAYLOAD)
    assert store.stream(record.content) == PAYLOAD


def test_the_bash_fd_idiom_works_with_the_argument_given(tmp_path, store):
    script = tmp_path / "idiom"
    script.write_text("#!/bin/bash\nprintf 'data on the fd' >&${1:-1}\necho 'description'\n")
    script.chmod(0o755)
    record = take_snapshot(script, 10, store.add)
    assert store.stream(record.content) == b"data on the fd"
    assert record.description == "description"


def test_a_non_zero_exit_is_an_error_with_the_end_of_stderr(tmp_path, store):
    script = write_script(
        tmp_path / "fails", "echo partial >&$1\necho 'noise' >&2\necho 'db is down' >&2\nexit 3\n"
    )
    record = take_snapshot(script, 10, store.add)
    assert record.exit_status == 3
    assert record.error is not None and "exited with status 3" in record.error
    assert record.error.endswith("noise\ndb is down") and "incomplete" in record.error


def test_a_snapshotter_killed_by_a_signal_is_an_error(tmp_path, store):
    script = write_script(tmp_path / "killed", "echo partial >&$1\nkill -9 $$\n")
    record = take_snapshot(script, 10, store.add)
    assert record.exit_status == -9
    assert record.error is not None and "killed by SIGKILL" in record.error


def test_a_hanging_snapshotter_is_stopped_at_the_timeout(tmp_path, store):
    script = write_script(tmp_path / "hangs", "echo started >&$1\nsleep 60\n")
    started = time.monotonic()
    record = take_snapshot(script, 0.5, store.add)
    assert time.monotonic() - started < 5
    assert record.exit_status == -15  # SIGTERM was enough
    assert record.error is not None and "0.5 s timeout" in record.error
    assert store.stream(record.content) == b"started\n"  # the partial stream is kept, marked failed


def test_time_spent_uploading_does_not_count_against_the_snapshotter(tmp_path, store, payload_file):
    script = write_script(tmp_path / "db", f"cat {payload_file} >&$1\n")

    def slow_uplink(kind: str, plaintext: bytes) -> str:
        time.sleep(0.1)
        return store.add(kind, plaintext)

    started = time.monotonic()
    record = take_snapshot(script, 1.0, slow_uplink)
    assert time.monotonic() - started > 1.0  # the run took longer than the timeout...
    assert record.error is None and store.stream(record.content) == PAYLOAD  # ...and that was our doing


def test_one_that_closes_the_stream_then_hangs_is_still_timed_out(tmp_path, store):
    script = write_script(tmp_path / "lingers", "echo all >&$1\nexec 3>&-\nsleep 60\n")
    record = take_snapshot(script, 0.5, store.add)
    assert record.error is not None and "timeout" in record.error


def test_one_that_ignores_sigterm_gets_sigkill(tmp_path, store, monkeypatch):
    monkeypatch.setattr(snapshots_module, "KILL_GRACE_S", 0.3)
    script = write_script(tmp_path / "stubborn", "trap '' TERM\necho x >&$1\nwhile :; do sleep 0.05; done\n")
    started = time.monotonic()
    record = take_snapshot(script, 0.3, store.add)
    assert time.monotonic() - started < 5
    assert record.exit_status == -9


def test_a_background_process_holding_the_pipe_cannot_stall_the_run(tmp_path, store):
    # setsid: out of the snapshotter's process group, so not even the group kill reaches it.
    script = write_script(tmp_path / "leaves", "echo x >&$1\nsetsid sleep 3 >&$1 2>&1 &\nexit 0\n")
    started = time.monotonic()
    record = take_snapshot(script, 0.5, store.add)
    assert time.monotonic() - started < 2.5
    assert record.error is not None and "timeout" in record.error


def test_a_chatty_stdout_never_blocks_and_is_capped(tmp_path, store):
    script = write_script(
        tmp_path / "chatty",
        "echo '::restore-through::cat'\nyes 'a long description line' | head -c 2000000\necho data >&$1\n",
    )
    record = take_snapshot(script, 10, store.add)
    assert record.error is None and store.stream(record.content) == b"data\n"
    assert record.restore_through == "cat"
    assert len(record.description) <= snapshots_module.MAX_DESCRIPTION_CHARS


def test_a_snapshotter_that_cannot_start_is_an_error(tmp_path, store):
    script = tmp_path / "broken"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    record = take_snapshot(script, 10, store.add)
    assert record.content is None and record.error is not None and "cannot run" in record.error


def test_when_the_sink_fails_the_snapshotter_is_killed_and_reaped(tmp_path, payload_file):
    pid_file = tmp_path / "pid"
    script = write_script(
        tmp_path / "db", f"echo $$ > {pid_file}\nwhile :; do cat {payload_file}; done >&$1\n"
    )

    def failing_add(kind: str, plaintext: bytes) -> str:
        raise ConnectionError("backend unreachable")

    with pytest.raises(ConnectionError):
        take_snapshot(script, 30, failing_add)
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists()  # neither running nor a zombie


def test_parse_description_takes_the_last_restore_through_line():
    description, command = parse_description(
        b"line one\n::restore-through::first\n  indented\n::restore-through:: psql -d x \n"
    )
    assert description == "line one\n  indented" and command == "psql -d x"
    assert parse_description(b"::restore-through::\n") == ("", None)


# -- through the archiver ---------------------------------------------------------------------


def test_an_unchanged_dump_uploads_nothing(run_archive, config_dir, backend, payload_file):
    write_script(config_dir / "snapshots.d" / "db", f"cat {payload_file} >&$1\n")
    first = run_archive()
    second = run_archive()
    assert first.exit_code == second.exit_code == EXIT_OK
    assert first.stats["bytes_uploaded"] > 0
    assert second.stats["bytes_uploaded"] == 0 and second.stats["packs"] == 0
    assert second.stats["snapshot_bytes"] == len(PAYLOAD)


def test_a_snapshotter_without_the_execute_bit_is_a_warning(run_archive, config_dir, backend):
    write_script(config_dir / "snapshots.d" / "db", "echo data >&$1\n")
    (config_dir / "snapshots.d" / "forgotten").write_text("#!/bin/sh\necho data >&$1\n")
    (config_dir / "snapshots.d" / "db.dpkg-old").write_text("an old copy, rightly ignored")
    result = run_archive()
    assert result.exit_code == EXIT_WARNINGS
    assert [w for w in result.warnings if "not executable" in w] == [
        f"{config_dir / 'snapshots.d' / 'forgotten'} is not executable, so no snapshot was taken "
        "(chmod +x it, or remove it)"
    ]
    assert [s["name"] for s in backend.get_manifest(result.manifest_id)["snapshots"]] == ["db"]


def test_a_failed_snapshot_makes_the_run_exit_with_warnings(run_archive, config_dir, backend):
    write_script(config_dir / "snapshots.d" / "db", "echo partial >&$1\nexit 4\n")
    result = run_archive()
    assert result.exit_code == EXIT_WARNINGS
    record = backend.get_manifest(result.manifest_id)["snapshots"][0]
    assert record["exit_status"] == 4 and "status 4" in record["error"]


# -- restoring ----------------------------------------------------------------------------------


@pytest.fixture
def archived(run_archive, config_dir, backend, transfer, payload_file, tmp_path):
    """A manifest with a good snapshot `db` (restore-through writes to restored.sql) and a failed `bad`."""
    restored = tmp_path / "restored.sql"
    write_script(
        config_dir / "snapshots.d" / "db",
        f"echo '::restore-through::cat > {restored} && echo done > {restored}.done'\n"
        f"cat {payload_file} >&$1\n",
    )
    write_script(
        config_dir / "snapshots.d" / "bad", "echo '::restore-through::cat'\necho partial >&$1\nexit 1\n"
    )
    result = run_archive()
    fetcher = BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]
    return backend.get_manifest(result.manifest_id), fetcher, restored


def test_restore_pipes_the_stream_into_its_command(archived):
    manifest, fetcher, restored = archived
    result = restore_through_command(fetcher, manifest, "db")
    assert restored.read_bytes() == PAYLOAD and result.bytes_written == len(PAYLOAD)
    assert Path(f"{restored}.done").read_text() == "done\n"


def test_a_command_failing_fails_the_restore(archived):
    manifest, fetcher, _ = archived
    manifest["snapshots"][1]["restore_through"] = "cat > /dev/null; exit 7"
    with pytest.raises(RestoreError, match="exited with status 7"):
        restore_through_command(fetcher, manifest, "db")


def test_a_command_that_stops_reading_early_fails_the_restore(archived):
    manifest, fetcher, _ = archived
    db = next(s for s in manifest["snapshots"] if s["name"] == "db")
    db["restore_through"] = "head -c 10 > /dev/null"
    with pytest.raises(RestoreError, match="stopped reading"):
        restore_through_command(fetcher, manifest, "db")


def test_a_stream_breaking_off_kills_the_command_before_it_sees_eof(archived, monkeypatch):
    manifest, fetcher, restored = archived
    monkeypatch.setattr(restorer_module, "SNAPSHOT_WINDOW_CHUNKS", 2)
    real_fetch_all = fetcher.fetch_all
    calls = []

    def breaks_on_second_window(hashes):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("network gone")
        return real_fetch_all(hashes)

    monkeypatch.setattr(fetcher, "fetch_all", breaks_on_second_window)
    with pytest.raises(ConnectionError):
        restore_through_command(fetcher, manifest, "db")
    time.sleep(0.2)
    assert not Path(f"{restored}.done").exists()  # `a && b` never ran b on half a stream


def test_a_failed_snapshot_is_refused_unless_the_partial_bytes_are_asked_for(archived, tmp_path):
    manifest, fetcher, _ = archived
    with pytest.raises(RestoreError, match=r"failed when it was taken.*incomplete"):
        restore_through_command(fetcher, manifest, "bad")
    with pytest.raises(RestoreError, match="failed when it was taken"):
        write_snapshot(fetcher, manifest, "bad", io.BytesIO())
    partial = tmp_path / "partial.bin"
    write_to_file(fetcher, manifest, "bad", str(partial), allow_incomplete=True)
    assert partial.read_bytes() == b"partial\n"


def test_output_file_appears_only_when_complete(archived, tmp_path, monkeypatch):
    manifest, fetcher, _ = archived
    target = tmp_path / "out" / "dump.sql"
    target.parent.mkdir()
    write_to_file(fetcher, manifest, "db", str(target))
    assert target.read_bytes() == PAYLOAD
    with pytest.raises(RestoreError, match="already exists"):
        write_to_file(fetcher, manifest, "db", str(target))
    monkeypatch.setattr(fetcher, "fetch_all", lambda hashes: (_ for _ in ()).throw(ConnectionError("gone")))
    fresh = tmp_path / "out" / "fresh.sql"
    with pytest.raises(ConnectionError):
        write_to_file(fetcher, manifest, "db", str(fresh))
    assert os.listdir(target.parent) == ["dump.sql"]  # no partial file left behind


def test_no_restore_through_command_means_output_is_needed(archived):
    manifest, fetcher, _ = archived
    next(s for s in manifest["snapshots"] if s["name"] == "db")["restore_through"] = None
    with pytest.raises(RestoreError, match="--output"):
        restore_through_command(fetcher, manifest, "db")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["/etc", "--snapshot", "db"], "a snapshot is restored whole"),
        (["--target", "/r", "--output", "x"], "go with --snapshot"),
        (["--snapshot", "db", "--incomplete"], "--incomplete needs --output"),
    ],
)
def test_restore_refuses_options_that_do_not_go_together(tmp_path, capsys, extra, message):
    assert main(["--config-dir", str(tmp_path), "restore", "latest", *extra]) == 1
    assert message in capsys.readouterr().err


# -- list ---------------------------------------------------------------------------------------


def test_list_shows_each_snapshot_with_size_state_and_description():
    manifest = {
        "manifest_id": "20260101T000000Z-00000001",
        "created": "2026-01-01T00:00:00Z",
        "stats": {"files": 0, "snapshots": 2},
        "snapshots": [
            {
                "name": "postgresql",
                "description": "PostgreSQL 15 cluster\nmore",
                "size": 3 * 2**20,
                "error": None,
            },
            {
                "name": "mysql",
                "description": "",
                "size": 10,
                "error": "exited with status 2; the stream is incomplete",
            },
        ],
    }
    lines = format_table([manifest]).splitlines()
    assert lines[2] == "  snapshot postgresql  3.0 MiB  ok  PostgreSQL 15 cluster"
    assert lines[3].startswith("  snapshot mysql  10 B  FAILED (exited with status 2")
    assert human_bytes(1536) == "1.5 KiB"
