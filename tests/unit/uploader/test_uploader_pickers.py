"""pickers.d: sorted, non-executables and backups skipped, failures and hangs are warnings."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import write_script
from s3_sysbackup.pickers import run_pickers, runnable_scripts


def test_runs_executables_in_order_and_keeps_names_exactly(tmp_path: Path):
    pickers = tmp_path / "pickers.d"
    write_script(pickers / "20-second", "printf '/b/with space \\n'\n")
    write_script(pickers / "10-first", "printf '/a\\n/b/with space \\n'\n")
    result = run_pickers(pickers, timeout_s=5)
    assert result.paths == ["/a", "/b/with space "]  # trailing space kept, duplicate dropped
    assert result.warnings == []


def test_skips_non_executables_and_editor_backups(tmp_path: Path):
    pickers = tmp_path / "pickers.d"
    write_script(pickers / "10-real", "echo /real\n")
    write_script(pickers / "10-real~", "echo /backup-tilde\n")
    write_script(pickers / "10-real.bak", "echo /backup-bak\n")
    write_script(pickers / ".hidden", "echo /hidden\n")
    plain = pickers / "30-not-executable"
    plain.write_text("#!/bin/sh\necho /not-executable\n")
    assert [p.name for p in runnable_scripts(pickers)] == ["10-real"]
    assert run_pickers(pickers, timeout_s=5).paths == ["/real"]


def test_failing_picker_is_a_warning_and_others_still_count(tmp_path: Path):
    pickers = tmp_path / "pickers.d"
    write_script(pickers / "10-fails", "echo /partial\necho 'disk on fire' >&2\nexit 4\n")
    write_script(pickers / "20-works", "echo /works\n")
    result = run_pickers(pickers, timeout_s=5)
    assert result.paths == ["/partial", "/works"]
    assert len(result.warnings) == 1
    assert "10-fails" in result.warnings[0] and "status 4" in result.warnings[0]
    assert "disk on fire" in result.warnings[0]


def test_hanging_picker_is_killed_with_its_children(tmp_path: Path):
    pickers = tmp_path / "pickers.d"
    marker = tmp_path / "child-survived"
    # The child outlives its parent unless the whole process group is killed.
    write_script(
        pickers / "10-hangs",
        f"echo /before-hang\nprintf '/incomplete-line'\n(sleep 2; touch {marker}) &\nsleep 60\n",
    )
    write_script(pickers / "20-works", "echo /works\n")
    started = time.monotonic()
    result = run_pickers(pickers, timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert result.paths == ["/before-hang", "/works"]  # the cut-off last line is not used
    assert any("10-hangs" in w and "timeout" in w for w in result.warnings)
    time.sleep(2.5)
    assert not marker.exists()


def test_relative_paths_are_ignored_with_a_warning(tmp_path: Path):
    pickers = tmp_path / "pickers.d"
    write_script(pickers / "10-relative", "echo etc/passwd\necho /etc/hosts\n")
    result = run_pickers(pickers, timeout_s=5)
    assert result.paths == ["/etc/hosts"]
    assert any("relative" in w for w in result.warnings)


def test_missing_directory_picks_nothing(tmp_path: Path):
    result = run_pickers(tmp_path / "absent", timeout_s=5)
    assert result.paths == [] and result.warnings == []
